"""Deployment: a (physically pruned) encoder as ONNX for ONNX Runtime, fp32 and dynamically quantised int8, and an
ONNX Runtime encoder that the project's own evaluation runs with the same protocol as the PyTorch models.

Layout (sentence-transformers' ONNX layout, beside the PyTorch weights of the same directory):
    onnx/model.onnx          fp32; inputs input_ids, attention_mask (token_type_ids for BERT); output last_hidden_state
    onnx/model_qint8.onnx    int8 weights (ONNX Runtime dynamic quantisation: MatMul, per output channel)

The graph comes from torch's own exporter (dynamo, opset 18) over the project's modeling code, so layers with
uneven head/neuron counts export as they are; ONNX Runtime's quantiser writes the int8 file. Requires the
`[onnx]` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .. import SparseCSEError
from ..method.evaluate import encode, evaluate_sts
from ..method.model import pool
from ..method.pruned_modeling import load_tokenizer
from . import onnx_fused

OPSET = 18
FP32_FILE = "onnx/model.onnx"
INT8_FILE = "onnx/model_qint8.onnx"
# per-channel int8 weights: on the 30 %-pruned MiniLM, per-tensor weights fell below 0.99 cosine to fp32 on STS-B
# test sentences (0.9805–0.9898 at 10–50 %), per channel stays above it (BENCHMARKS row 3)
QUANT_SETTINGS = {"per_channel": True, "reduce_range": False, "op_types_to_quantize": ["MatMul", "Attention"]}
FUSED = "fused"
# A MatMul whose input carries outlier activations (its largest |x| above OUTLIER_RATIO × the 99.9th percentile of
# |x| on the calibration sentences) stays fp32 in the int8 file: dynamic int8 quantises activations per tensor, so
# a few huge values leave the rest of the tensor a handful of levels. On all-mpnet-base-v2 pruned 30 % the FFN
# output projections of layers 6–10 have ratios 18–43 (every other MatMul ≤ 11; all-MiniLM-L6-v2's ≤ 12): with them
# fp32, int8's STS-B moved −0.10 instead of −0.44 against fp32 and its lowest cosine to fp32 rose from 0.84 to 0.98,
# at 1.63× fp32's speed instead of 1.85× (BENCHMARKS row 3c, step 2).
OUTLIER_RATIO = 16.0
CALIBRATION = (  # generic sentences of the lengths embedding models meet; activation outliers show on any text
    "A man is playing a guitar on the street.", "The cat sleeps on the warm windowsill.",
    "Stocks fell sharply after the central bank raised interest rates again.",
    "How do I reset my password if I no longer have access to my email?",
    "The committee will meet on Thursday to discuss the new budget proposal and its impact on schools.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She said the train was late because of heavy snow in the mountains.", "Best pizza in town, open late!",
    "The treaty was signed in 1648, ending thirty years of war in central Europe.",
    "Two dogs are running through a field of tall grass.",
    "Researchers found that the new drug reduced symptoms in most patients within two weeks.",
    "Is it going to rain tomorrow?", "The software update fixes a bug that caused the app to crash on startup.",
    "He scored twice in the second half, and his team won the championship.",
    "A woman is slicing tomatoes in a kitchen.", "The museum's collection includes paintings from the 17th century.",
)


def kept_fp32(onnx_path: str | Path, tokenizer=None) -> list[str]:
    """The nodes the int8 quantiser leaves in fp32:
    - MatMuls whose weight has a zero-sized dimension: a layer pruned to no heads has 0-wide Q/K/V and a 0-deep
      output projection (torch exporter's graph). ONNX Runtime's MatMulInteger leaves such a product uninitialised
      (garbage, NaN) where fp32 MatMul returns the zeros it should; they hold no weights to quantise anyway.
    - the first layer's attention projection (the fused Attention node of a padded graph, or the Q|K|V MatMul
      before a MultiHeadAttention): it reads the embedding LayerNorm's output, whose dynamic (per-tensor) int8
      quantisation cost most of int8's STS-B loss — measured on the 30 % MiniLM export: −0.32 with it quantised,
      −0.01 without (BENCHMARKS row 3), for 1/6 of the QKV work in fp32.
    - with a tokenizer: the MatMuls whose inputs carry outlier activations (`outlier_matmuls`)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    empty = {t.name for t in model.graph.initializer if 0 in t.dims}
    kept = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i in empty for i in n.input)]
    first = _first_attention_projection(model.graph)
    outliers = outlier_matmuls(model, tokenizer) if tokenizer is not None else []
    return kept + ([first] if first else []) + [n for n in outliers if n not in kept and n != first]


def _first_attention_projection(graph) -> str | None:
    """The node that projects the first layer's input to Q|K|V: the first Attention node itself, or for a
    MultiHeadAttention (MPNet) the MatMul whose product is split into its query, key and value."""
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "Attention":
            return n.name
        if n.op_type == "MultiHeadAttention":  # back from its query through Split (and a padding-free graph's
            node = producer.get(n.input[0])   # Reshape and ScatterND of the packed rows) to the MatMul
            while node is not None and node.op_type in ("Split", "Reshape", "ScatterND"):
                node = producer.get(node.input[2] if node.op_type == "ScatterND" else node.input[0])
            return node.name if node is not None and node.op_type == "MatMul" else None
    return None


def int8_summary(path: str | Path) -> str:
    """What the int8 file quantised, in a sentence for the model card: its attention and weight matmuls, how many
    of each are integer and how many stayed fp32 (kept_fp32 says why)."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    attention = ops.count("Attention") + ops.count("QAttention") + ops.count("MultiHeadAttention")
    matmul = ops.count("MatMul") + ops.count("MatMulInteger")
    mha = (" (MultiHeadAttention holds no weights: its Q|K|V projection is one of the matmuls)"
           if "MultiHeadAttention" in ops else "")
    return (f"int8: {ops.count('QAttention')} of {attention} attention nodes as QAttention{mha} and "
            f"{ops.count('MatMulInteger')} of {matmul} matmuls as integer matmuls; fp32 stay the first layer's "
            "attention projection and the matmuls whose inputs carry outlier activations or that a pruned layer "
            "left empty.")


def outlier_matmuls(model, tokenizer, sentences=CALIBRATION) -> list[str]:
    """The weight MatMuls of `model` (an fp32 ModelProto) whose input's largest |x| exceeds OUTLIER_RATIO × its
    99.9th percentile over the real tokens of `sentences` (the fp32 graph run once with those inputs as outputs)."""
    import onnx
    import onnxruntime as ort

    weights = {t.name for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None)
                              for n in matmuls if n.input[0] not in have)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = tokenizer(list(sentences), padding=True, return_tensors="np")
    zeros = np.zeros_like(batch["input_ids"], dtype=np.int64)  # an input the tokenizer does not give
    feed = {i.name: batch[i.name].astype(np.int64) if i.name in batch else zeros for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feed)))
    real = batch["attention_mask"].astype(bool)
    out = []
    for n in matmuls:
        v = values[n.input[0]]
        x = np.abs(v[real] if v.shape[:2] == real.shape else v)  # the real tokens, where the graph keeps (B, T, …)
        if x.size and x.max() > OUTLIER_RATIO * max(float(np.quantile(x, 0.999)), 1e-12):
            out.append(n.name)
    return out


def sentences_per_s(run, sentences: list[str], reps: int = 2) -> float:
    """Throughput of `run(sentences)`: best of `reps` after a warm-up on the first 64 (a runtime's first call
    allocates) — how the export measures each of its paths."""
    import time

    run(sentences[:64])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(sentences)
        times.append(time.perf_counter() - t0)
    return len(sentences) / min(times)


def _require():
    import importlib.util

    for name in ("onnx", "onnxruntime", "onnxscript"):
        if importlib.util.find_spec(name) is None:
            raise SparseCSEError(f"ONNX export/runtime needs the [onnx] extra ({name} is missing): "
                                 "pip install 'sparsecse[onnx]'")


class _LastHidden(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state


@contextlib.contextmanager
def _quiet_logs():
    """The exporter's and quantiser's INFO/WARNING chatter (absent torchvision ops, the exporter's steps) off."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx"), logging.getLogger("torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def input_names(tokenizer) -> list[str]:
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]


def family_of(backbone) -> str:
    """The model family of a stock or physically pruned backbone (its config's model_type, sparsecse_ prefix off)."""
    mtype = backbone.config.model_type
    return mtype[len("sparsecse_"):].replace("_", "-") if mtype.startswith("sparsecse_") else mtype


def export_onnx(backbone, tokenizer, out_dir: str | Path, quantize: bool = True,
                padding_free: bool = True) -> tuple[list[str], str]:
    """Write `out_dir`/onnx/model.onnx (and model_qint8.onnx) from a backbone (dense or physically pruned); returns
    the files written and which graph they hold: "fused" (`onnx_fused`: a MultiHeadAttention node per layer with
    the layer's own head count; with `padding_free`, the default, every per-token node on the real tokens only),
    or why the family went through torch's exporter instead. The caller writes into a
    directory it publishes atomically (export.export_model)."""
    _require()
    out_dir = Path(out_dir)
    (out_dir / "onnx").mkdir(parents=True, exist_ok=True)
    names = input_names(tokenizer)
    model = backbone.cpu().eval()
    reason = onnx_fused.unsupported(family_of(model), model.config)
    if reason is None:
        with torch.no_grad():
            onnx_fused.write(model, family_of(model), names, out_dir / FP32_FILE, padding_free)
    else:
        _torch_export(model, tokenizer, names, out_dir / FP32_FILE)
    files = [FP32_FILE]
    if quantize:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet_logs():  # its advice to pre-process: symbolic shape inference does not complete on these graphs
            quantize_dynamic(str(out_dir / FP32_FILE), str(out_dir / INT8_FILE), weight_type=QuantType.QInt8,
                             nodes_to_exclude=kept_fp32(out_dir / FP32_FILE, tokenizer),
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **QUANT_SETTINGS)
        files.append(INT8_FILE)
    return files, reason or FUSED


def _torch_export(model, tokenizer, names: list[str], path: Path) -> None:
    """The graph torch's exporter (dynamo, opset 18) writes from the project's modeling code: every family
    exports this way, with attention as separate reshapes, matmuls and a softmax per layer."""
    import warnings

    sample = tokenizer(["a short one", "a longer sentence, so that the batch is padded"], padding=True,
                       return_tensors="pt")
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    with warnings.catch_warnings(), torch.no_grad(), _quiet_logs():  # (a pruned model exports its stock forward)
        warnings.simplefilter("ignore")
        torch.onnx.export(_LastHidden(model), tuple(sample[n] for n in names), str(path), dynamo=True,
                          external_data=False, opset_version=OPSET, input_names=names,
                          output_names=["last_hidden_state"], dynamic_shapes=tuple(dims for _ in names), verbose=False)


def measure(model_dir: str | Path, files: list[str], sentences: list[str] | None = None, data_dir: Path | None = None,
            pooler: str = "cls_before_pooler", threads: int | None = None) -> list[dict]:
    """Per ONNX file: size, encode throughput on `sentences` (batches of 64 sorted by length) and STS-B test
    Spearman × 100 (with `data_dir`) — what the model card lists."""
    rows = []
    for f in files:
        enc = OnnxEncoder(model_dir, f, pooler=pooler, threads=threads)
        row = {"file": f, "mb": (Path(model_dir) / f).stat().st_size / 2 ** 20}
        if sentences:
            row["sentences_per_s"] = sentences_per_s(lambda batch, e=enc: encode(e, batch, batch_size=64), sentences)
        if data_dir is not None:
            row["stsb_test"] = evaluate_sts(enc, data_dir, tasks=("STSBenchmark",), pooler=pooler)["STSBenchmark"]
        rows.append(row)
    return rows


class OnnxEncoder:
    """An ONNX Runtime session with the Encoder interface evaluation uses (tokenizer, pooled forward, eval/train):
    `evaluate.encode`, the STS evaluation and the transfer tasks run on it unchanged. `pooler`: cls_before_pooler
    (CLS), avg (mean over tokens) or cls (CLS + SimCSE's MLP, read from the directory's sparsecse.safetensors)."""

    def __init__(self, model_dir: str | Path, file: str = FP32_FILE, pooler: str | None = None,
                 threads: int | None = None, optimize: bool = True):
        _require()
        import onnxruntime as ort

        d = Path(model_dir)
        path = d / file
        if not path.is_file():
            have = sorted(str(p.relative_to(d)) for p in d.glob("onnx/*.onnx"))
            raise SparseCSEError(f"{path}: no such ONNX file; "
                                 + (f"choose --file from {', '.join(have)}" if have else
                                    "export one with `sparsecse export SOURCE --out DIR --onnx`"))
        missing = [f for f in ("config.json", "tokenizer_config.json") if not (d / f).is_file()]
        if missing:
            raise SparseCSEError(f"--model {d}: holds {file} but no {missing[0]} (the tokenizer and config the ONNX "
                                 "graph is read with); pass the export's directory (`sparsecse export … --onnx`), "
                                 "e.g. EXPORT/pruned")
        meta = json.loads((d / "sparsecse.json").read_text()) if (d / "sparsecse.json").is_file() else {}
        self.pooler = pooler or meta.get("pooler", "cls_before_pooler")
        self.training = False

        self.tokenizer = load_tokenizer(d)
        opts = ort.SessionOptions()
        # as many threads as torch computes with (`--threads` sets both; by default every core)
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        if not optimize:  # ONNX Runtime's graph fusions off (what they give is measured in BENCHMARKS row 3)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own classes (InvalidProtobuf, Fail, …)
            raise SparseCSEError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:160]}); export it "
                                 "again with `sparsecse export … --onnx`") from None
        self.names = [i.name for i in self.session.get_inputs()]
        self.mlp = None
        if self.pooler == "cls":  # SimCSE's MLP pooler, as the PyTorch Encoder holds it
            from safetensors.torch import load_file

            t = load_file(str(d / "sparsecse.safetensors"))
            self.mlp = torch.nn.Sequential(torch.nn.Linear(*t["mlp.weight"].shape[::-1]), torch.nn.Tanh()).eval()
            self.mlp[0].load_state_dict({"weight": t["mlp.weight"], "bias": t["mlp.bias"]})
        self._device = torch.zeros(0)

    # the parts of torch.nn.Module's interface evaluation touches
    def parameters(self):
        yield self._device

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooler: str | None = None) -> torch.Tensor:
        feed = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": attention_mask.numpy().astype(np.int64)}
        if "token_type_ids" in self.names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        out = torch.from_numpy(self.session.run(None, {n: feed[n] for n in self.names})[0])
        pooler = pooler or self.pooler
        if pooler == "cls" and self.mlp is None:
            raise SparseCSEError("pooler cls: build the OnnxEncoder with pooler='cls' so SimCSE's MLP "
                                 "(sparsecse.safetensors) is loaded")
        with torch.no_grad():
            return pool(out, attention_mask, pooler, self.mlp)
