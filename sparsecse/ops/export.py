"""Export a masked model as (1) a dense checkpoint with pruned weights zeroed, loadable by
`transformers.AutoModel` and `sentence_transformers.SentenceTransformer`, and (2) a physically pruned
checkpoint (`pruned/`, narrower Linear layers, its modeling code included), plus a model card.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .. import SparseCSEError, __version__
from ..core.checkpoints import EXTRA_FILE, META_FILE
from ..core.checkpoints import best_model
from ..core.io import atomic_dir, verify_manifest
from ..core.results import LAST_DEV
from ..core.storage import fetch_model, is_uri, open_storage, probe_timeout_s, scratch_dir
from ..core.tables import label, render
from ..method import pruned_modeling
from ..method.data import read_lines
from ..method.model import Encoder, load_encoder
from ..method.prune import physical_prune, zero_pruned_weights
from .hub import CITATION, base_settings, card_metadata, front_matter, versions
from .onnx_export import FUSED, INT8_FILE, export_onnx, int8_summary, measure, sentences_per_s

MODELING_FILE = "modeling_sparsecse.py"


def _add_sentence_transformers(d: Path, pooler: str, mlp: nn.Linear, max_seq_length: int, remote: bool,
                               normalize: bool = False) -> None:
    """Make the HF model directory `d` a SentenceTransformer too, through sentence-transformers' own save: its
    Transformer (loaded from `d`), CLS or mean Pooling and, for SimCSE's MLP pooler, a Dense(tanh) head holding
    the MLP, and a Normalize step where the base model had one. Its files are added beside the HF ones, which stay
    as written (ST's copy of them is dropped)."""
    import tempfile

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    kw = {"trust_remote_code": True} if remote else {}
    tr = Transformer(str(d), max_seq_length=max_seq_length, model_kwargs=kw, config_kwargs=kw, processor_kwargs=kw)
    dim = tr.get_embedding_dimension()
    modules = [tr, Pooling(dim, "mean" if pooler == "avg" else "cls")]
    if pooler == "cls":  # SimCSE's MLP pooler = a Dense(tanh) module after CLS pooling
        modules.append(Dense(dim, dim, activation_function=nn.Tanh(), init_weight=mlp.weight.detach().cpu(),
                             init_bias=mlp.bias.detach().cpu()))
    if normalize:
        modules.append(Normalize())
    with tempfile.TemporaryDirectory(dir=d.parent) as st_dir:
        SentenceTransformer(modules=modules, device="cpu").save(st_dir, create_model_card=False)
        for f in sorted(Path(st_dir).iterdir()):
            if not (d / f.name).exists():
                shutil.move(str(f), d / f.name)


# the embedding each pooler evaluates, as a user computes it from `last_hidden_state` (the model card's words)
EMBEDDING = {"cls_before_pooler": "the CLS row of `last_hidden_state` (`[:, 0]`, no MLP)",
             "avg": "the mean of `last_hidden_state` over the tokens the attention mask keeps (mean pooling)",
             "cls": "the CLS row of `last_hidden_state` through SimCSE's MLP pooler (dense + tanh; the "
                    "sentence-transformers Dense module, `mlp.*` in sparsecse.safetensors)"}


def _model_card(meta: dict, results: dict | None, params: dict, onnx_rows: list[dict] | None = None,
                base: dict | None = None, pruned: bool = False, speed: list[dict] | None = None) -> str:
    """The export's README.md in the Hub's form: YAML metadata (license, base_model, pipeline_tag, tags, a
    model-index of the STS results), what the model is, how to load it, its results, limitations, versions and the
    citation. No local path of the exporting machine appears in it."""
    base = base or {}
    name = f"sparsecse-{meta.get('sparsity', 0):.0%}".replace("%", "pct")
    fields = [[k, str(meta[k])] for k in ("sparsity", "lam", "seed", "scores_fingerprint", LAST_DEV, "pooler")
              if k in meta]
    if base.get("base_model"):
        fields.insert(0, ["base model", base["base_model"]])
    fields += [["parameters (dense)", f"{params['dense']:,}"], ["parameters (pruned/)", f"{params['pruned']:,}"],
               ["encoder-layer parameters (dense → pruned)", f"{params['layers_dense']:,} → {params['layers_pruned']:,}"]]
    here = "THIS_DIR" if pruned else "THIS_DIR/pruned"
    lines = [front_matter(card_metadata(name, base, results, pruned)),
             f"# SparseCSE model: {meta.get('sparsity', 0):.0%} of heads and FFN neurons pruned"
             + (" (physically smaller)" if pruned else " (dense, pruned units zeroed)"), "",
             "Produced by [sparsecse](https://pypi.org/project/sparsecse/): unsupervised SimCSE, every attention head "
             "and FFN neuron scored by alignment/uniformity, the lowest-scoring fraction removed, the remaining "
             "weights rewound to the pre-trained checkpoint and retrained (An, Zhang & Song 2023)."
             + (" This folder holds the physically smaller model (narrower layers; its modeling code is included, "
                "hence `trust_remote_code`)." if pruned else f" The physically smaller model is in `{here}`."), "",
             render(["field", "value"], fields, left=2), "", "## Usage", "", "```python",
             "from sentence_transformers import SentenceTransformer",
             (f"model = SentenceTransformer('{here if pruned else 'THIS_DIR'}'"
              + (", trust_remote_code=True)" if pruned else ")")),
             "embeddings = model.encode(['A man is playing a guitar.', 'Someone plays an instrument.'])",
             "```", "",
             f"With `transformers.AutoModel`, {EMBEDDING.get(meta.get('pooler'), EMBEDDING['cls_before_pooler'])} is "
             "the embedding evaluated below" + (", loaded with `trust_remote_code=True`. On a padded batch the model "
                                                "runs on the real tokens only (`packed.py`): the same states there, "
                                                "zeros at the padded positions of `last_hidden_state` "
                                                "(`model.padding_free = False` runs the stock forward)." if pruned else
                       "; `pooler_output` is SimCSE's training-time MLP pooler (stored as `pooler.dense`, as SimCSE's "
                       f"released checkpoints do). The smaller model: `{here}`."), ""]
    if results:
        lines += ["## Evaluation (Spearman × 100, cosine, SentEval protocol)", "",
                  render([label(t) for t in results], [list(results.values())], left=0), ""]
    if onnx_rows:
        lines += [f"## ONNX (physically pruned, in `{'onnx/' if pruned else 'pruned/onnx/'}`)", "",
                  "For ONNX Runtime: inputs as the tokenizer gives them, output `last_hidden_state`; the embedding is "
                  f"{EMBEDDING.get(meta.get('pooler'), EMBEDDING['cls_before_pooler'])}. Speed: sentences/s encoding "
                  "256 wiki sentences in length-sorted batches of 64 on the exporting machine; STS-B test: "
                  "Spearman × 100. "
                  + ("Graph: ONNX Runtime's fused transformer ops (a MultiHeadAttention node per layer with that "
                     "layer's own head count, SkipLayerNormalization, BiasGelu), padding-free: every per-token node "
                     "runs on the real tokens only, attention on the padded layout; `last_hidden_state` is zero at "
                     "padded positions."
                     if onnx_rows[0]["graph"] == FUSED else f"Graph: unfused ({onnx_rows[0]['graph']}).")
                  + (f" {onnx_rows[0]['int8']}" if onnx_rows[0].get("int8") else ""), "",
                  render(["file", "size (MB)", "sentences/s", "STS-B test"],
                         [[r["file"], f"{r['mb']:.1f}", r.get("sentences_per_s"), r.get("stsb_test")]
                          for r in onnx_rows], left=1), ""]
    if speed:
        lines += ["## Speed", "", f"Encoding {SPEED_SENTENCES} wiki sentences (batches of 64, CPU, best of two) on the "
                  "exporting machine, against the dense model under sentence-transformers on the same machine:", "",
                  render(["path", "sentences/s", "× dense"], [[r["path"], f"{r['sentences_per_s']:.0f}",
                                                                 f"{r['x_dense']:.2f}×"] for r in speed], left=1), ""]
    lines += ["## Limitations", "",
              "The figures above are what the exporting sweep measured; a model trained at small budgets (sparsecse's "
              "quickstart trains 16 steps) is a pipeline demo, usually below the model it started from. Compare it "
              "with the sweep's report: the unpruned control, trained the same way, is the model to beat, and the "
              "report says whether the choice holds on test sets no choice touched.", "",
              "## Versions", "", versions(), "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


SPEED_SENTENCES = 256  # wiki sentences each path encodes when the export measures its speed


def _speed_sentences(data_dir: Path | None) -> list[str] | None:
    wiki = data_dir / "wiki" / "wiki1m_sample.txt" if data_dir is not None else None
    return read_lines(wiki)[:SPEED_SENTENCES] if wiki is not None and wiki.is_file() else None


def _onnx(pruned, tokenizer, pdir: Path, quantize: bool, data_dir: Path | None, sentences: list[str] | None,
          pooler: str) -> list[dict]:
    """pruned/onnx/: the physically pruned model as ONNX (+ int8), each file measured for the model card."""
    files, graph = export_onnx(pruned, tokenizer, pdir, quantize=quantize)
    int8 = int8_summary(pdir / INT8_FILE) if INT8_FILE in files else None
    return [r | {"graph": graph, "int8": int8}
            for r in measure(pdir, files, sentences=sentences, data_dir=data_dir, pooler=pooler)]


def st_speed(model_dir: Path, sentences: list[str], remote: bool) -> float:
    """Sentences per second of `model_dir` as sentence-transformers runs it (its default torch backend, batches
    of 64): the path a user of the export takes."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", trust_remote_code=remote)
    return sentences_per_s(lambda batch: model.encode(batch, batch_size=64), sentences)


def speed_rows(dense_dir: Path, pruned_dir: Path, sentences: list[str], onnx_rows: list[dict] | None) -> list[dict]:
    """The export's speed on this machine, each path against the dense model under sentence-transformers (the
    baseline a user compares with): the pruned model under sentence-transformers, and each ONNX file."""
    base = st_speed(dense_dir, sentences, remote=False)
    rows = [{"path": "sentence-transformers, dense", "sentences_per_s": base},
            {"path": "sentence-transformers, pruned/", "sentences_per_s": st_speed(pruned_dir, sentences, remote=True)}]
    rows += [{"path": f"ONNX Runtime, pruned/{r['file']}", "sentences_per_s": r["sentences_per_s"]}
             for r in onnx_rows or [] if r.get("sentences_per_s")]
    return [r | {"x_dense": r["sentences_per_s"] / base} for r in rows]


def _layer_params(model: nn.Module, layers_attr: str) -> int:
    import operator
    return sum(p.numel() for p in operator.attrgetter(layers_attr)(model).parameters())


def _attach_mlp_as_hf_pooler(enc: Encoder) -> None:
    """Give the backbone its family's pooler (dense + tanh) holding SimCSE's MLP pooler, as SimCSE's released
    models do, so `save_pretrained` writes `pooler.dense`: `AutoModel` then loads with no missing weights,
    `pooler_output` is the training-time pooler and `last_hidden_state[:, 0]` the evaluation embedding."""
    bb = enc.backbone
    if not enc.adapter.pooling_layer:  # a family with no pooler (ELECTRA, DistilBERT, ModernBERT): the MLP stays in
        return  # sparsecse.safetensors and the sentence-transformers Dense module only
    with torch.device("meta"):  # the family's own pooler, as its constructor builds it (no memory for the rest)
        pooler = type(bb)(bb.config, add_pooling_layer=True).pooler
    bb.pooler = pooler.to_empty(device="cpu")
    bb.pooler.dense.load_state_dict(enc.mlp[0].state_dict())


def export_model(source: str | Encoder, out: str | os.PathLike, pooler: str | None = None,
                 results: dict | None = None, meta: dict | None = None, max_seq_length: int | None = None,
                 onnx: bool = False, quantize: bool = True, data_dir: Path | None = None) -> Path:
    """Write OUT/ (dense, AutoModel + SentenceTransformer) and OUT/pruned/ (physical) atomically; with `onnx`,
    also OUT/pruned/onnx/ (fp32, and int8 with `quantize`), measured for the model card (size; speed and STS-B
    test with `data_dir`)."""
    enc = load_encoder(source) if isinstance(source, str) else source
    if enc.physical:
        raise SparseCSEError(f"{source}: is already physically pruned; export the masked checkpoint instead")
    meta = {**enc.meta, **(meta or {})}
    meta.pop("config", None)
    base = base_settings(meta.get("pretrained"))
    max_seq_length = max_seq_length or base["max_seq_length"] or 128
    pooler = pooler or meta.get("eval_pooler") or "cls_before_pooler"
    dense = copy.deepcopy(enc).cpu().eval()
    zero_pruned_weights(dense)
    pruned = physical_prune(dense)
    out = Path(out)
    params = {"dense": sum(p.numel() for p in dense.backbone.parameters()),
              "pruned": sum(p.numel() for p in pruned.parameters()),
              "layers_dense": _layer_params(dense.backbone, dense.adapter.layers),
              "layers_pruned": _layer_params(pruned, dense.adapter.layers)}
    with atomic_dir(out) as tmp:
        _attach_mlp_as_hf_pooler(dense)  # after physical_prune: the pruned model keeps no pooler
        dense.backbone.save_pretrained(tmp, safe_serialization=True)
        tokenizer = copy.deepcopy(dense.tokenizer)
        tokenizer.model_max_length = max_seq_length  # what sentence-transformers reads as max_seq_length
        tokenizer.save_pretrained(tmp)
        _add_sentence_transformers(tmp, pooler, dense.mlp[0], max_seq_length, remote=False, normalize=base["normalize"])
        pdir = tmp / "pruned"
        pruned.config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.{type(pruned.config).__name__}",
                                  "AutoModel": f"{MODELING_FILE[:-3]}.{type(pruned).__name__}"}
        pruned.save_pretrained(pdir, safe_serialization=True)
        tokenizer.save_pretrained(pdir)
        shutil.copyfile(pruned_modeling.__file__, pdir / MODELING_FILE)
        shutil.copyfile(Path(pruned_modeling.__file__).with_name("packed.py"), pdir / "packed.py")  # its import
        _add_sentence_transformers(pdir, pooler, dense.mlp[0], max_seq_length, remote=True, normalize=base["normalize"])
        from safetensors.torch import save_file
        mlp = {"mlp.weight": dense.mlp[0].weight.detach().contiguous().cpu(),
               "mlp.bias": dense.mlp[0].bias.detach().contiguous().cpu()}
        save_file(mlp, str(tmp / EXTRA_FILE))
        save_file(mlp, str(pdir / EXTRA_FILE))
        sentences = _speed_sentences(data_dir)
        onnx_rows = _onnx(pruned, dense.tokenizer, pdir, quantize, data_dir, sentences, pooler) if onnx else None
        speed = speed_rows(tmp, pdir, sentences, onnx_rows) if sentences else None
        info = {**meta, "pooler": pooler, "version": __version__, "params": params, **({"speed": speed} if speed else {})}
        (tmp / META_FILE).write_text(json.dumps({**info, "physical": False}, indent=2, sort_keys=True, default=str))
        (pdir / META_FILE).write_text(json.dumps({**info, "physical": True}, indent=2, sort_keys=True, default=str))
        for d, physical in ((tmp, False), (pdir, True)):
            (d / "README.md").write_text(_model_card(meta | {"pooler": pooler}, results, params, onnx_rows, base,
                                                     pruned=physical, speed=speed))
    return out


def is_run(source: str) -> bool:
    """Whether `source` names a sweep's run: a URI (s3://…) or a directory holding sweep.json."""
    return is_uri(source) or (Path(source) / "sweep.json").is_file()


def export_from_run(source: str, out: str | os.PathLike, pooler: str | None = None, onnx: bool = False,
                    quantize: bool = True, data_dir: Path | None = None, timeout_s: float | None = None) -> Path:
    """A local export of a sweep's run on any storage: its export/ copied, or (no export yet, another pooler or
    ONNX files it lacks asked for) built here from the selected trial's best checkpoint. The storage is probed
    within `timeout_s` (a cloud filesystem without credentials can otherwise look for them for minutes)."""
    store = open_storage(source, timeout_s or probe_timeout_s(), flag="SOURCE")
    if not store.is_file("sweep.json"):
        raise SparseCSEError(f"{store.uri}: holds no sweep (sweep.json missing); pass a run's --out")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise SparseCSEError(f"--out {out}: exists and is not an export; choose an empty or new directory")
    onnx_files = ["export/pruned/onnx/model.onnx"] + (["export/pruned/onnx/model_qint8.onnx"] if quantize else [])
    if pooler is None and store.is_file("export/manifest.json") and (
            not onnx or all(store.is_file(f) for f in onnx_files)):
        with atomic_dir(out) as tmp:
            store.download_dir("export", tmp)
            verify_manifest(tmp)
        return out
    selected = (store.read_json("sweep.json").get("summary") or {}).get("selected")
    if not selected or not selected.get("checkpoint"):
        raise SparseCSEError(f"{store.uri}: the sweep has not selected a model yet; finish it with `sparsecse sweep "
                             "… --resume` first")
    with scratch_dir("export") as tmp:
        model = fetch_model(store, best_model(store, selected["checkpoint"]), tmp)
        return export_model(str(model), out, pooler=pooler, results=selected.get("test"), onnx=onnx,
                            quantize=quantize, data_dir=data_dir)
