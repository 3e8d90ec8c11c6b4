"""The pruned encoder as ONNX Runtime's fused transformer graph, written from the weights.

ONNX Runtime's own optimizer fuses attention by matching the exporter's reshape/transpose pattern against one
head count for the whole model, which a pruned model (a head count per layer) does not have: the exported graph then
runs every layer's attention as separate reshapes, matmuls and a softmax. Here each layer is written directly as the
nodes the optimizer would have produced, with that layer's own head count:

    embeddings   com.microsoft.EmbedLayerNormalization (word + position [+ token type] → LayerNorm) [→ MatMul]
    attention    com.microsoft.Attention (q|k|v packed, num_heads = the layer's heads, the padding mask)
                 → MatMul(output) → com.microsoft.SkipLayerNormalization (residual + bias + LayerNorm in one node)
    FFN          MatMul → com.microsoft.BiasGelu / FastGelu (bias + activation) → MatMul → SkipLayerNormalization

    MPNet        MatMul (q|k|v) → Split → com.microsoft.MultiHeadAttention (q|k|v bias, the padding mask and the
                 relative-position bias: (1, heads, T, T), gathered once per graph from a table of the model's
                 buckets by relative offset; a pruned layer takes its kept heads' rows of it)

    padding-free (the default, `build(..., padding_free=True)`): the real tokens' rows are gathered once after the
                 embeddings (NonZero of the mask); every projection, FFN and residual + LayerNorm runs on those N
                 rows, and each layer's attention is its q|k|v MatMul on them, scattered into the padded
                 (B, T, ·) layout for MultiHeadAttention and gathered back; `last_hidden_state` is zero at padded
                 positions. ONNX Runtime removes padding itself only on CUDA: on CPU this is 1.09–1.43× faster in
                 fp32 and 1.07–1.29× in int8 than the padded graph (BENCHMARKS row 3e).

A layer pruned to no heads (no neurons) keeps only its output projection's bias, exactly as the masked layer does.
ONNX Runtime's dynamic quantiser turns Attention into QAttention and MatMul into integer matmuls (int8 file).
MPNet's attention is written as MultiHeadAttention after a plain MatMul because QAttention has no attention-bias
input (quantising a biased Attention drops the bias without a word): the MatMul is quantised, the attention itself
holds no weights.

Families: the post-LayerNorm encoders (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT with absolute positions;
MPNet with its relative-position bias). ModernBERT (rotary positions, local attention, pre-LayerNorm, gated FFN)
is exported through torch's exporter instead (`onnx_export.export_onnx` says so).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPSET = 17  # LayerNormalization is a standard op from 17
MS = "com.microsoft"

# family: embeddings, layers, q/k/v, attention output, attention LayerNorm, FFN in, FFN out, FFN LayerNorm,
#         position rule (arange or offset by padding as RoBERTa does), config key of the activation
_BERT = ("embeddings", "encoder.layer", ("attention.self.query", "attention.self.key", "attention.self.value"),
         "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense", "output.dense",
         "output.LayerNorm", "arange", "hidden_act")
LAYOUTS = {
    "bert": _BERT, "electra": _BERT,
    "roberta": _BERT[:8] + ("padding", "hidden_act"), "xlm-roberta": _BERT[:8] + ("padding", "hidden_act"),
    "distilbert": ("embeddings", "transformer.layer", ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
                   "attention.out_lin", "sa_layer_norm", "ffn.lin1", "ffn.lin2", "output_layer_norm", "arange",
                   "activation"),
    "mpnet": ("embeddings", "encoder.layer", ("attention.attn.q", "attention.attn.k", "attention.attn.v"),
              "attention.attn.o", "attention.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm",
              "padding", "hidden_act"),
}
NOT_FUSED = {
    "modernbert": "ModernBERT uses rotary positions, local attention windows and a gated FFN, which ONNX Runtime's "
                  "fused BERT ops do not express; exported through torch's exporter",
}
# activation → (fused op, domain); BiasGelu is erf GELU (BERT's "gelu"), FastGelu the tanh approximation
ACTIVATIONS = {"gelu": ("BiasGelu", MS), "gelu_new": ("FastGelu", MS), "gelu_pytorch_tanh": ("FastGelu", MS),
               "gelu_fast": ("FastGelu", MS), "relu": ("Relu", "")}


def unsupported(family: str, config) -> str | None:
    """Why `family`/`config` cannot be written as the fused graph, or None when it can."""
    if family not in LAYOUTS:
        return NOT_FUSED.get(family, f"no fused layout for model type {family!r}; exported through torch's exporter")
    act = getattr(config, LAYOUTS[family][9], None)
    if not isinstance(act, str) or act not in ACTIVATIONS:
        return f"activation {act!r} has no fused ONNX Runtime op; exported through torch's exporter"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return (f"position_embedding_type {config.position_embedding_type!r} is not absolute; exported through "
                "torch's exporter")
    return None


class _Graph:
    """Nodes and initializers under construction, with fresh names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def const(self, stem: str, value) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], domain: str = "", n_out: int = 1, **attrs) -> str | list[str]:
        from onnx import helper

        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain or None,
                                           **attrs))
        return outs[0] if n_out == 1 else outs


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _heads(layer, q_path: str, d: int) -> int:
    try:
        return operator.attrgetter(q_path)(layer).out_features // d
    except AttributeError:  # a layer pruned to no heads keeps no q/k/v
        return 0


def _neurons(layer, path: str) -> int:
    try:
        return operator.attrgetter(path)(layer).out_features
    except AttributeError:
        return 0


def _embeddings(g: _Graph, emb, positions: str, input_names: list[str]) -> str:
    """One EmbedLayerNormalization node (word + position [+ token type] → LayerNorm); a model given no token types
    adds type 0's row everywhere, folded here into the position table. RoBERTa's positions count real tokens from
    padding_idx + 1 (padding keeps padding_idx), computed from the ids as the model does."""
    from onnx import TensorProto

    ids32 = g.op("Cast", ["input_ids"], to=TensorProto.INT32)
    position_table = _np(emb.position_embeddings.weight)
    types = getattr(emb, "token_type_embeddings", None)
    with_types = types is not None and "token_type_ids" in input_names
    if types is not None and not with_types:
        position_table = position_table + _np(types.weight[0])
    inputs = [ids32, g.op("Cast", ["token_type_ids"], to=TensorProto.INT32) if with_types else "",
              g.const("word_embeddings", _np(emb.word_embeddings.weight)), g.const("position_embeddings", position_table),
              g.const("token_type_embeddings", _np(types.weight)) if with_types else "",
              g.const("ln_w", _np(emb.LayerNorm.weight)), g.const("ln_b", _np(emb.LayerNorm.bias)), ""]
    if positions == "padding":
        pad = np.array(emb.padding_idx, np.int32)
        real = g.op("Cast", [g.op("Not", [g.op("Equal", [ids32, g.const("pad", pad)])])], to=TensorProto.INT32)
        inputs.append(g.op("Add", [g.op("Mul", [g.op("CumSum", [real, g.const("axis", np.array(1, np.int64))]), real]),
                                   g.const("pad", pad)]))
    return g.op("EmbedLayerNormalization", inputs, domain=MS, n_out=2, epsilon=float(emb.LayerNorm.eps))[0]


def _skip_ln(g: _Graph, inp: str | None, residual: str, bias: np.ndarray, ln) -> str:
    """LayerNorm(residual + inp + bias) as one SkipLayerNormalization; with nothing left of the sublayer (no heads,
    no neurons), LayerNorm(residual + bias)."""
    if inp is None:
        added = g.op("Add", [residual, g.const("bias", bias)])
        return g.op("LayerNormalization", [added, g.const("ln_w", _np(ln.weight)), g.const("ln_b", _np(ln.bias))],
                    epsilon=float(ln.eps), axis=-1)
    return g.op("SkipLayerNormalization", [inp, residual, g.const("ln_w", _np(ln.weight)), g.const("ln_b", _np(ln.bias)),
                                           g.const("bias", bias)], domain=MS, epsilon=float(ln.eps))


def _position_bias(g: _Graph, backbone) -> tuple[str, int]:
    """MPNet's relative-position bias for the batch's length T, (1, heads, T, T), as the model computes it: the
    bucket of each offset j − i (the model's own bucketing, tabulated here for every offset its positions allow)
    looks up the encoder's bias embedding. Returns the tensor's name and the model's head count."""
    import torch

    encoder = backbone.encoder
    span = backbone.config.max_position_embeddings
    offsets = torch.arange(-(span - 1), span)
    table = _np(encoder.relative_attention_bias.weight)[encoder.relative_position_bucket(offsets).numpy()]
    length = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("one", np.array(1, np.int64))], axis=0)
    pos = g.op("Range", [g.const("zero", np.array(0, np.int64)), length, g.const("step", np.array(1, np.int64))])
    offset = g.op("Sub", [g.op("Unsqueeze", [pos, g.const("axes", np.array([0], np.int64))]),
                          g.op("Unsqueeze", [pos, g.const("axes", np.array([1], np.int64))])])  # [i, j] = j − i
    rows = g.op("Gather", [g.const("rel_bias", table),
                           g.op("Add", [offset, g.const("span", np.array(span - 1, np.int64))])], axis=0)
    bias = g.op("Unsqueeze", [g.op("Transpose", [rows], perm=[2, 0, 1]), g.const("axes", np.array([0], np.int64))])
    return bias, table.shape[1]


def _layer_bias(g: _Graph, bias: tuple[str, int] | None, kept, h: int) -> str:
    """The attention_bias input of a layer with `h` heads: the whole bias, or its kept heads' rows; "" for none."""
    if bias is None:
        return ""
    name, full = bias
    if h == full:
        return name
    if kept is None or len(kept) != h:
        raise ValueError(f"a layer with {h} of {full} heads names no kept heads (config.kept_heads)")
    return g.op("Gather", [name, g.const("kept_heads", np.array(kept, np.int64))], axis=1)


class _Packing:
    """Where a batch's real tokens are, for a padding-free graph: `idx` (N,) their flat positions among the B·T
    slots (Gather), `idx2` the same as (N, 1) (ScatterND). Every per-token node — projections, FFN, residual +
    LayerNorm — runs on the (N, width) packed rows; attention alone sees the padded (B, T, width) layout."""

    def __init__(self, g: _Graph):
        flat = g.op("Reshape", ["attention_mask", g.const("flat", np.array([-1], np.int64))])
        found = g.op("NonZero", [flat])  # (1, N)
        self.idx = g.op("Squeeze", [found, g.const("axes", np.array([0], np.int64))])
        self.idx2 = g.op("Transpose", [found], perm=[1, 0])
        self.slots, self.shape = g.op("Shape", [flat]), g.op("Shape", ["input_ids"])  # [B·T], [B, T]
        self._unpacking: dict[int, tuple[str, str]] = {}  # width -> (zeros (B·T, width), shape [B, T, width])

    def pack(self, g: _Graph, t: str, width: int) -> str:
        """(B, T, width) -> (N, width): the real tokens' rows."""
        rows = g.op("Reshape", [t, g.const("rows", np.array([-1, width], np.int64))])
        return g.op("Gather", [rows, self.idx], axis=0)

    def unpack(self, g: _Graph, t: str, width: int) -> str:
        """(N, width) -> (B, T, width), zeros at the padding."""
        if width not in self._unpacking:  # once per width: layers of equal head counts share them
            w = g.const("width", np.array([width], np.int64))
            self._unpacking[width] = (g.op("ConstantOfShape", [g.op("Concat", [self.slots, w], axis=0)]),
                                      g.op("Concat", [self.shape, w], axis=0))
        zeros, shape = self._unpacking[width]
        return g.op("Reshape", [g.op("ScatterND", [zeros, self.idx2, t]), shape])


@dataclass(frozen=True)
class _Setup:
    """What every layer of one graph shares: the padding mask, the head width, the family's layout and activation,
    MPNet's relative-position bias, and the packing of a padding-free graph (None: the padded one)."""
    mask32: str
    d: int
    layout: tuple
    act: tuple[str, str]
    position_bias: tuple[str, int] | None = None
    pack: _Packing | None = None


def _attention(g: _Graph, layer, x: str, h: int, setup: _Setup, kept) -> str:
    """The layer's attention context: one fused Attention node (padded graph, no bias), or its q|k|v MatMul —
    which int8 quantises — then MultiHeadAttention (MPNet's bias, or a padding-free graph: the projection runs on
    the packed rows, the attention on the padded layout)."""
    get, d = operator.attrgetter, setup.d
    qkv_paths = setup.layout[2]
    w = np.concatenate([_np(get(p)(layer).weight).T for p in qkv_paths], axis=1)
    b = np.concatenate([_np(get(p)(layer).bias) for p in qkv_paths])
    extra = _layer_bias(g, setup.position_bias, kept, h)
    if not extra and setup.pack is None:
        return g.op("Attention", [x, g.const("qkv_w", w), g.const("qkv_b", b), setup.mask32], domain=MS, num_heads=h)
    qkv = g.op("MatMul", [x, g.const("qkv_w", w)])
    if setup.pack is not None:
        qkv = setup.pack.unpack(g, qkv, 3 * h * d)
    thirds = g.const("thirds", np.array([h * d] * 3, np.int64))
    q, k, v = g.op("Split", [qkv, thirds], axis=-1, n_out=3)
    ctx = g.op("MultiHeadAttention", [q, k, v, g.const("qkv_b", b), setup.mask32, extra], domain=MS, num_heads=h)
    return ctx if setup.pack is None else setup.pack.pack(g, ctx, h * d)


def _layer(g: _Graph, layer, x: str, setup: _Setup, kept=None) -> str:
    """One post-LayerNorm encoder layer: attention with the layer's own head count (and, for MPNet, the
    relative-position bias of its `kept` heads), then the FFN."""
    _, _, qkv, o, ln1, f_in, f_out, ln2, _, _ = setup.layout
    get = operator.attrgetter
    h, out = _heads(layer, qkv[0], setup.d), get(o)(layer)
    attn = None
    if h:
        attn = g.op("MatMul", [_attention(g, layer, x, h, setup, kept), g.const("o_w", _np(out.weight).T)])
    x = _skip_ln(g, attn, x, _np(out.bias), get(ln1)(layer))
    second, down = get(f_out)(layer), None
    if _neurons(layer, f_in):
        first = get(f_in)(layer)
        up = g.op("MatMul", [x, g.const("ffn_in_w", _np(first.weight).T)])
        if setup.act[0] == "Relu":
            up = g.op("Relu", [g.op("Add", [up, g.const("ffn_in_b", _np(first.bias))])])
        else:
            up = g.op(setup.act[0], [up, g.const("ffn_in_b", _np(first.bias))], domain=setup.act[1])
        down = g.op("MatMul", [up, g.const("ffn_out_w", _np(second.weight).T)])
    return _skip_ln(g, down, x, _np(second.bias), get(ln2)(layer))


def build(backbone, family: str, input_names: list[str], padding_free: bool = True):
    """The fused ModelProto of `backbone` (a stock or physically pruned encoder of `family`): inputs
    `input_names` (int64, batch × sequence), output last_hidden_state (batch × sequence × hidden) — with
    `padding_free`, every per-token node on the real tokens only and zeros at the padded positions (_Packing)."""
    from onnx import TensorProto, helper

    reason = unsupported(family, backbone.config)
    if reason:
        raise ValueError(reason)
    layout = LAYOUTS[family]
    cfg = backbone.config
    emb = operator.attrgetter(layout[0])(backbone)
    hidden = emb.LayerNorm.weight.shape[0]
    g = _Graph()
    x = _embeddings(g, emb, layout[8], input_names)
    project = getattr(backbone, "embeddings_project", None)  # ELECTRA with embedding_size < hidden_size
    if project is not None:
        hidden = project.out_features
        x = g.op("Add", [g.op("MatMul", [x, g.const("proj_w", _np(project.weight).T)]),
                         g.const("proj_b", _np(project.bias))])
    d = hidden // (getattr(cfg, "num_attention_heads", None) or cfg.n_heads)
    pack = _Packing(g) if padding_free else None
    if pack is not None:
        x = pack.pack(g, x, hidden)
    setup = _Setup(g.op("Cast", ["attention_mask"], to=TensorProto.INT32), d, layout,
                   ACTIVATIONS[getattr(cfg, layout[9])], _position_bias(g, backbone) if family == "mpnet" else None,
                   pack)
    layers = operator.attrgetter(layout[1])(backbone)
    kept = getattr(cfg, "kept_heads", None) or [None] * len(layers)
    for layer, keep in zip(layers, kept):
        x = _layer(g, layer, x, setup, keep)
    if pack is not None:
        x = pack.unpack(g, x, hidden)
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in input_names]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    graph = helper.make_graph(g.nodes, "sparsecse_fused_encoder", inputs, [output], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                             producer_name="sparsecse")


def write(backbone, family: str, input_names: list[str], path: str | Path, padding_free: bool = True) -> None:
    import onnx

    onnx.save(build(backbone, family, input_names, padding_free), str(path))
