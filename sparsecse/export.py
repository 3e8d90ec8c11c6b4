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

from . import SparseCSEError, __version__
from .io import atomic_dir
from .model import EXTRA_FILE, META_FILE, Encoder, load_encoder
from .prune import zero_pruned_weights

MODELING_FILE = "modeling_sparsecse.py"


def _write_sentence_transformers(enc: Encoder, d: Path, pooler: str, max_seq_length: int) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                             "do_lower_case": False}, indent=2))
    (d / "1_Pooling").mkdir()
    dim = enc.backbone.config.hidden_size
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": pooler in ("cls", "cls_before_pooler"),
        "pooling_mode_mean_tokens": pooler == "avg", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    if pooler == "cls":  # SimCSE's MLP pooler = a Dense(tanh) module after CLS pooling
        from safetensors.torch import save_file

        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (d / "2_Dense").mkdir()
        (d / "2_Dense" / "config.json").write_text(json.dumps({
            "in_features": dim, "out_features": dim, "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh"}, indent=2))
        save_file({"linear.weight": enc.mlp[0].weight.detach().contiguous().cpu(),
                   "linear.bias": enc.mlp[0].bias.detach().contiguous().cpu()}, str(d / "2_Dense" / "model.safetensors"))
    (d / "modules.json").write_text(json.dumps(modules, indent=2))


def physical_prune(enc: Encoder) -> nn.Module:
    """A SparseCSE{Bert,Roberta}Model with masked heads' Q/K/V rows + output columns and masked neurons'
    FFN rows + columns removed. Its output equals the masked encoder's."""
    from . import pruned_modeling

    cfg = enc.backbone.config
    family = cfg.model_type
    if family not in pruned_modeling.CLASSES:
        raise SparseCSEError(f"physical pruning supports bert and roberta, not {family!r}")
    cfg_cls, model_cls = pruned_modeling.CLASSES[family]
    d = cfg.hidden_size // cfg.num_attention_heads
    keep_heads = [torch.nonzero(enc.head_mask[li] != 0).flatten() for li in range(enc.num_layers)]
    keep_neurons = [torch.nonzero(enc.neuron_mask[li] != 0).flatten() for li in range(enc.num_layers)]
    base = cfg.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        base.pop(k, None)
    new_cfg = cfg_cls(heads_per_layer=[int(k.numel()) for k in keep_heads],
                      intermediate_per_layer=[int(k.numel()) for k in keep_neurons], **base)
    new_cfg.architectures = [model_cls.__name__]
    new = model_cls(new_cfg)
    # how each parameter of a layer is sliced: rows (outputs) of Q/K/V and FFN-in, columns of the two outputs
    a = enc.adapter
    plan = {}
    for li in range(enc.num_layers):
        h_idx = (torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep_heads[li].tolist()])
                 if keep_heads[li].numel() else torch.zeros(0, dtype=torch.long))
        p = f"{a.layers}.{li}."
        for name in ("query", "key", "value"):
            plan[p + getattr(a, name) + ".weight"] = plan[p + getattr(a, name) + ".bias"] = ("rows", h_idx)
        plan[p + a.inter_dense + ".weight"] = plan[p + a.inter_dense + ".bias"] = ("rows", keep_neurons[li])
        plan[p + a.attn_out + ".weight"] = ("cols", h_idx)
        plan[p + a.ffn_out + ".weight"] = ("cols", keep_neurons[li])
    src = enc.backbone.state_dict()
    dst = {}
    for k, v in new.state_dict().items():
        how, idx = plan.get(k, (None, None))
        if k not in src:  # Q/K/V of a layer with no heads left
            continue
        t = src[k] if how is None else (src[k][idx] if how == "rows" else src[k][:, idx])
        if tuple(t.shape) != tuple(v.shape):
            raise SparseCSEError(f"physical pruning: {k} has shape {tuple(t.shape)}, expected {tuple(v.shape)}")
        dst[k] = t.clone()
    missing, unexpected = new.load_state_dict(dst, strict=False)
    if missing or unexpected:
        raise SparseCSEError(f"physical pruning left parameters unset: {missing or unexpected}")
    return new.eval()


def _model_card(meta: dict, results: dict | None, params: dict) -> str:
    lines = ["---", "library_name: sentence-transformers", "tags: [sentence-embeddings, sparsecse, pruning]", "---", "",
             f"# SparseCSE model (sparsity {meta.get('sparsity', 0):.0%}, λ={meta.get('lam', '—')})", "",
             "Produced by [sparsecse](https://pypi.org/project/sparsecse/): unsupervised SimCSE, heads and FFN "
             "neurons scored by alignment/uniformity, the lowest-scoring fraction pruned, remaining weights "
             "rewound to the pre-trained checkpoint and retrained (An, Zhang & Song 2023).", "",
             "| field | value |", "|---|---|"]
    for k in ("source", "pretrained", "sparsity", "lam", "seed", "scores", "scores_fingerprint", "stsb_dev", "pooler"):
        if k in meta:
            lines.append(f"| {k} | {meta[k]} |")
    lines += [f"| parameters (dense) | {params['dense']:,} |", f"| parameters (pruned/) | {params['pruned']:,} |",
              f"| encoder-layer parameters (dense → pruned) | {params['layers_dense']:,} → {params['layers_pruned']:,} |",
              "", "## Loading", "", "```python", "from sentence_transformers import SentenceTransformer",
              "model = SentenceTransformer('THIS_DIR')                      # dense, pruned units zeroed",
              "model = SentenceTransformer('THIS_DIR/pruned', trust_remote_code=True)  # physically smaller",
              "```", "",
              "With `transformers.AutoModel`, `last_hidden_state[:, 0]` is the embedding evaluated above (CLS, no "
              "MLP) and `pooler_output` is SimCSE's training-time MLP pooler (stored as `pooler.dense`, as SimCSE's "
              "released checkpoints do).", ""]
    if results:
        lines += ["## Evaluation (Spearman × 100)", "", "| " + " | ".join(results) + " |",
                  "|" + "---|" * len(results), "| " + " | ".join(f"{v:.2f}" for v in results.values()) + " |", ""]
    return "\n".join(lines)


def _layer_params(model: nn.Module, layers_attr: str) -> int:
    import operator
    return sum(p.numel() for p in operator.attrgetter(layers_attr)(model).parameters())


def _attach_mlp_as_hf_pooler(enc: Encoder) -> None:
    """Give the backbone its family's pooler (dense + tanh) holding SimCSE's MLP pooler, as SimCSE's released
    models do, so `save_pretrained` writes `pooler.dense`: `AutoModel` then loads with no missing weights,
    `pooler_output` is the training-time pooler and `last_hidden_state[:, 0]` the evaluation embedding."""
    import sys

    bb = enc.backbone
    pooler_cls = getattr(sys.modules[type(bb).__module__], type(bb).__name__.replace("Model", "Pooler"), None)
    if pooler_cls is None:  # a family without a BERT-style pooler: nothing to store
        return
    bb.pooler = pooler_cls(bb.config)
    bb.pooler.dense.load_state_dict(enc.mlp[0].state_dict())


def export_model(source: str | Encoder, out: str | os.PathLike, pooler: str | None = None,
                 results: dict | None = None, meta: dict | None = None, max_seq_length: int = 128) -> Path:
    """Write OUT/ (dense, AutoModel + SentenceTransformer) and OUT/pruned/ (physical) atomically."""
    enc = load_encoder(source) if isinstance(source, str) else source
    if enc.physical:
        raise SparseCSEError(f"{source}: is already physically pruned; export the masked checkpoint instead")
    meta = {**enc.meta, **(meta or {})}
    meta.pop("config", None)
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
        dense.tokenizer.save_pretrained(tmp)
        _write_sentence_transformers(dense, tmp, pooler, max_seq_length)
        pdir = tmp / "pruned"
        pruned.config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.{type(pruned.config).__name__}",
                                  "AutoModel": f"{MODELING_FILE[:-3]}.{type(pruned).__name__}"}
        pruned.save_pretrained(pdir, safe_serialization=True)
        dense.tokenizer.save_pretrained(pdir)
        shutil.copyfile(Path(__file__).with_name("pruned_modeling.py"), pdir / MODELING_FILE)
        _write_sentence_transformers(dense, pdir, pooler, max_seq_length)
        from safetensors.torch import save_file
        mlp = {"mlp.weight": dense.mlp[0].weight.detach().contiguous().cpu(),
               "mlp.bias": dense.mlp[0].bias.detach().contiguous().cpu()}
        save_file(mlp, str(tmp / EXTRA_FILE))
        save_file(mlp, str(pdir / EXTRA_FILE))
        info = {**meta, "pooler": pooler, "version": __version__, "params": params}
        (tmp / META_FILE).write_text(json.dumps({**info, "physical": False}, indent=2, sort_keys=True, default=str))
        (pdir / META_FILE).write_text(json.dumps({**info, "physical": True}, indent=2, sort_keys=True, default=str))
        (tmp / "README.md").write_text(_model_card(meta | {"pooler": pooler}, results, params))
    return out


def is_run(source: str) -> bool:
    """Whether `source` names a sweep's run: a URI (s3://…) or a directory holding sweep.json."""
    from .storage import is_uri

    return is_uri(source) or (Path(source) / "sweep.json").is_file()


def export_from_run(source: str, out: str | os.PathLike, pooler: str | None = None) -> Path:
    """A local export of a sweep's run on any storage: its export/ copied, or (no export yet, or another pooler
    asked for) built here from the selected trial's best checkpoint."""
    from .io import verify_manifest
    from .storage import Storage, fetch_model, scratch_dir

    store = Storage(source)
    if not store.is_file("sweep.json"):
        raise SparseCSEError(f"{store.uri}: holds no sweep (sweep.json missing); pass a run's --out")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise SparseCSEError(f"--out {out}: exists and is not an export; choose an empty or new directory")
    if pooler is None and store.is_file("export/manifest.json"):
        with atomic_dir(out) as tmp:
            store.download_dir("export", tmp)
            verify_manifest(tmp)
        return out
    selected = (store.read_json("sweep.json").get("summary") or {}).get("selected")
    if not selected or not selected.get("checkpoint"):
        raise SparseCSEError(f"{store.uri}: the sweep has not selected a model yet; finish it with `sparsecse sweep "
                             "… --resume` first")
    with scratch_dir("export") as tmp:
        model = fetch_model(store, f"{selected['checkpoint']}/best", tmp)
        return export_model(str(model), out, pooler=pooler, results=selected.get("test"))
