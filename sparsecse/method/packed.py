"""The padding-free encoder forward: the layers of BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, MPNet and ModernBERT
run on the real tokens of a batch only.

The same modules and weights as `backbone(...)` (mask hooks included), but the per-token work — Q/K/V and output
projections, FFN, LayerNorms — runs on the N real tokens instead of B·T padded slots, and with `cls_only` the last
layer computes its query, output projection and FFN for the CLS token alone (nothing else reaches a CLS pooler).
Only attention itself sees the padded (B, heads, T, d) layout. Equal to the padded forward up to float rounding
(tests/test_packed.py), and to dropout's random draws.

It calls the layer's sub-modules directly, so it relies on how transformers builds them. `why_not(backbone, adapter)`
checks each of those assumptions on the loaded model; anything it does not recognise (another layer class, a
decoder, cross-attention, relative position embeddings, a chunked FFN) runs the backbone's own forward instead.

ModernBERT differs in three ways, each taken from its own modules: rotary positions (its `rotary_emb` per layer
type, applied to each packed token's query and key at the token's position), local attention (a sliding-window
layer's keys within `config.local_attention // 2` of the query, inclusive, as transformers' mask) and pre-LayerNorm
layers closed by `final_norm`.

This file also holds each family's `Adapter` (where masks and pruning find its modules) and imports nothing but
torch: a physically pruned export ships it beside its modeling file, whose forward runs padding-free on a padded
batch (pruned_modeling.py).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# the layer classes whose sub-modules this forward reimplements: BERT's and those transformers copies from it
# (ELECTRA's included), DistilBERT's TransformerBlock (the same post-LayerNorm layer under other names) and MPNet's
# (BERT's, with a relative-position bias added to every head's scores), ModernBERT's pre-LayerNorm layer
BERT_LAYERS = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer")
DISTILBERT_LAYER, MPNET_LAYER, MODERNBERT_LAYER = "TransformerBlock", "MPNetLayer", "ModernBertEncoderLayer"
LAYER_CLASSES = (*BERT_LAYERS, DISTILBERT_LAYER, MPNET_LAYER, MODERNBERT_LAYER)
ATTENTION_TYPES = ("full_attention", "sliding_attention")  # ModernBERT's layer types


@dataclass(frozen=True)
class Adapter:
    """Where a backbone family keeps the modules masks and pruning touch (paths relative to a layer), and how its
    config names them. Heads: the output projection's input (B, T, H·d) is scaled per head (a pre-hook), and head
    h owns rows h·d … (h+1)·d of the query, key and value projections — or, in a fused [q; k; v] projection (`qkv`,
    ModernBERT's Wqkv, which the attention views as (3, H, d)), those rows of each third. Neurons: neuron j is the
    j-th output of the FFN's first projection — in a gated one (`gated`, ModernBERT's Wi = [value; gate], chunked
    in two), rows j and I + j together, so the value and its gate are kept or removed as a pair — and the j-th
    input of its second; the mask scales that input (a hook on `intermediate`, act(dense(x)), or, where no module
    computes it alone, a pre-hook on `ffn_out`)."""

    layers: str = "encoder.layer"
    query: str = "attention.self.query"
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    qkv: str | None = None  # a fused [q; k; v] projection replaces query/key/value
    attn_out: str = "attention.output.dense"
    attn_self: str = "attention.self"  # has query/key/value, num_attention_heads, attention_head_size, scaling, dropout
    attn_output: str = "attention.output"  # forward(context, residual) = LayerNorm(dropout(dense(context)) + residual)
    ffn_output: str = "output"  # forward(intermediate, residual), same shape as attn_output
    intermediate: str | None = "intermediate"  # output = act(dense(x)), (B, T, I); None: pre-hook on ffn_out
    inter_dense: str = "intermediate.dense"
    gated: bool = False
    ffn_out: str = "output.dense"
    intermediate_size: str = "intermediate_size"  # the config attribute holding I
    dropouts: tuple[str, ...] = ("hidden_dropout_prob", "attention_probs_dropout_prob")  # train.dropout sets these
    pooling_layer: bool = True  # the model's constructor takes add_pooling_layer (BERT's pooler)

    def get(self, module: nn.Module, what: str) -> nn.Module:
        return operator.attrgetter(getattr(self, what))(module)

    def head_rows(self, layer: nn.Module, heads: torch.Tensor, d: int, num_heads: int) -> list:
        """[(projection, its output rows)] that compute the given heads' queries, keys and values."""
        cols = (heads[:, None] * d + torch.arange(d)).flatten()
        if self.qkv:
            return [(self.get(layer, "qkv"), torch.cat([cols + i * num_heads * d for i in range(3)]))]
        return [(self.get(layer, n), cols) for n in ("query", "key", "value")]

    def neuron_rows(self, layer: nn.Module, neurons: torch.Tensor, size: int) -> list:
        """[(projection, its output rows)] that compute the given FFN neurons (value and gate rows when gated)."""
        return [(self.get(layer, "inter_dense"), torch.cat([neurons, neurons + size]) if self.gated else neurons)]


BERT_LIKE = Adapter()
ADAPTERS = {
    "bert": BERT_LIKE, "roberta": BERT_LIKE, "xlm-roberta": BERT_LIKE,
    "electra": Adapter(pooling_layer=False),
    "mpnet": Adapter(query="attention.attn.q", key="attention.attn.k", value="attention.attn.v",
                     attn_out="attention.attn.o", attn_self="attention.attn", attn_output="attention"),
    "distilbert": Adapter(layers="transformer.layer", query="attention.q_lin", key="attention.k_lin",
                          value="attention.v_lin", attn_out="attention.out_lin", attn_self="attention",
                          attn_output="attention", ffn_output="ffn", intermediate="ffn.activation",
                          inter_dense="ffn.lin1", ffn_out="ffn.lin2", intermediate_size="hidden_dim",
                          dropouts=("dropout", "attention_dropout"), pooling_layer=False),
    "modernbert": Adapter(layers="layers", qkv="attn.Wqkv", attn_out="attn.Wo", attn_self="attn", attn_output="attn",
                          ffn_output="mlp", intermediate=None, inter_dense="mlp.Wi", gated=True, ffn_out="mlp.Wo",
                          dropouts=("attention_dropout", "mlp_dropout", "embedding_dropout"), pooling_layer=False),
}
ADAPTERS.update({f"sparsecse_{k.replace('-', '_')}": v for k, v in list(ADAPTERS.items())})  # physically pruned


def _two_arg_forward(module: nn.Module) -> bool:
    """forward(hidden, residual): BertSelfOutput / BertOutput's LayerNorm(dropout(dense(x)) + residual)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) == 2 and all(hasattr(module, a) for a in ("dense", "LayerNorm", "dropout"))


def _attention_ok(sa: nn.Module, q: str, k: str, v: str, heads: str, scaled: bool = True) -> bool:
    return (all(isinstance(getattr(sa, n, None), nn.Linear) for n in (q, k, v))
            and isinstance(getattr(sa, "dropout", None), nn.Dropout)
            and (not scaled or isinstance(getattr(sa, "scaling", None), float))
            and isinstance(getattr(sa, heads, None), int)
            and isinstance(getattr(sa, "attention_head_size", None), int))


def _modernbert_why_not(li: int, layer: nn.Module) -> str | None:
    attn = layer.attn
    if hasattr(attn, "Wqkv") and not (all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("Wqkv", "Wo"))
                                      and isinstance(getattr(attn, "head_dim", None), int)
                                      and isinstance(getattr(attn, "attention_dropout", None), (int, float))
                                      and callable(getattr(attn, "out_drop", None))):
        return f"layer {li}'s attention lacks Wqkv/Wo/head_dim/attention_dropout/out_drop"
    if getattr(layer, "attention_type", None) not in ATTENTION_TYPES:
        return f"layer {li}'s attention_type is not one of {', '.join(ATTENTION_TYPES)}"
    if not all(callable(getattr(layer, n, None)) for n in ("attn_norm", "mlp_norm", "mlp")):
        return f"layer {li} is not ModernBERT's attn_norm, attn, mlp_norm, mlp"
    return None


def _rotary(layer: nn.Module):
    """ModernBERT's apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim), from the module that defines its layer."""
    return getattr(inspect.getmodule(type(layer)), "apply_rotary_pos_emb", None)


def _modernbert_model_why_not(backbone: nn.Module, layers: list) -> str | None:
    rotary = getattr(backbone, "rotary_emb", None)
    if not (callable(rotary) and "layer_type" in inspect.signature(rotary.forward).parameters):
        return "a ModernBERT without rotary_emb(x, position_ids, layer_type)"
    if not (callable(getattr(backbone, "final_norm", None)) and callable(_rotary(layers[0]))
            and isinstance(getattr(backbone.config, "local_attention", None), int)):
        return "a ModernBERT without final_norm, apply_rotary_pos_emb or config.local_attention"
    return None


def _layer_why_not(li: int, layer: nn.Module, adapter) -> str | None:
    if type(layer).__name__ == MODERNBERT_LAYER:
        return _modernbert_why_not(li, layer)
    if type(layer).__name__ == DISTILBERT_LAYER:
        att, ffn = layer.attention, layer.ffn
        if hasattr(att, "q_lin") and not (_attention_ok(att, "q_lin", "k_lin", "v_lin", "n_heads")
                                          and isinstance(getattr(att, "out_lin", None), nn.Linear)):
            return f"layer {li}'s attention lacks q_lin/k_lin/v_lin/out_lin/scaling/dropout/head sizes"
        if not (all(isinstance(getattr(layer, n, None), nn.LayerNorm) for n in ("sa_layer_norm", "output_layer_norm"))
                and all(isinstance(getattr(ffn, n, None), nn.Linear) for n in ("lin1", "lin2"))):
            return f"layer {li} is not DistilBERT's attention, sa_layer_norm, ffn(lin1, lin2), output_layer_norm"
        return None
    if type(layer).__name__ == MPNET_LAYER:
        sa = layer.attention.attn
        if hasattr(sa, "q") and not (_attention_ok(sa, "q", "k", "v", "num_attention_heads", scaled=False)
                                     and isinstance(getattr(sa, "o", None), nn.Linear)):
            return f"layer {li}'s attention lacks q/k/v/o/dropout/head sizes"
        if not (isinstance(getattr(layer.attention, "LayerNorm", None), nn.LayerNorm)
                and isinstance(getattr(layer.attention, "dropout", None), nn.Dropout)
                and _two_arg_forward(layer.output)):
            return f"layer {li} is not MPNet's attention(attn, LayerNorm, dropout), intermediate, output"
        return None
    sa = adapter.get(layer, "attn_self")
    if hasattr(sa, "query") and not _attention_ok(sa, "query", "key", "value", "num_attention_heads"):
        return f"layer {li}'s self-attention lacks query/key/value/scaling/dropout/head sizes"
    for what in ("attn_output", "ffn_output"):
        if not _two_arg_forward(adapter.get(layer, what)):
            return f"layer {li}'s {what} is not forward(hidden, residual) with dense/LayerNorm/dropout"
    return None


def why_not(backbone: nn.Module, adapter) -> str | None:
    """None when the packed forward computes exactly what `backbone(...)` computes; else the reason it cannot."""
    cfg = backbone.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "a decoder / cross-attention model"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={cfg.position_embedding_type!r}"
    if getattr(cfg, "chunk_size_feed_forward", 0):
        return "a chunked feed-forward"
    if not callable(getattr(backbone, "embeddings", None)):
        return "no `embeddings` module"
    layers = list(adapter.get(backbone, "layers"))
    if type(layers[0]).__name__ == MPNET_LAYER and not callable(
            getattr(getattr(backbone, "encoder", None), "compute_position_bias", None)):
        return "an MPNet encoder without compute_position_bias"
    if type(layers[0]).__name__ == MODERNBERT_LAYER and (reason := _modernbert_model_why_not(backbone, layers)):
        return reason
    for li, layer in enumerate(layers):
        if type(layer).__name__ not in LAYER_CLASSES:
            return f"layer {li} is a {type(layer).__name__}, not one of {', '.join(LAYER_CLASSES)}"
        reason = _layer_why_not(li, layer, adapter)
        if reason:
            return reason
    return None


def supports(backbone: nn.Module, adapter) -> bool:
    return why_not(backbone, adapter) is None


class _Batch(NamedTuple):
    """Where a batch's real tokens are: B sentences of T slots, `idx` the flat padded position of each packed token,
    `starts` each sentence's first (CLS) token in the packed order, `key_mask` (B, 1, 1, T) the real keys."""
    B: int
    T: int
    idx: torch.Tensor
    starts: torch.Tensor
    key_mask: torch.Tensor


def packed_forward(backbone: nn.Module, adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cls_only: bool) -> torch.Tensor:
    """The backbone's encoder on real tokens only; returns CLS states (B, D) or, for `cls_only=False`, (B, T, D)
    with zeros at padding. Only for a backbone that `supports`."""
    B, T = input_ids.shape
    valid = attention_mask.bool()
    lengths = valid.sum(1)
    batch = _Batch(B, T, valid.reshape(-1).nonzero().squeeze(1), torch.cumsum(lengths, 0) - lengths,
                   valid[:, None, None, :])
    x = backbone.embeddings(input_ids=input_ids)  # (B, T, D): word + position + type, LayerNorm, dropout
    if getattr(backbone, "embeddings_project", None) is not None:  # ELECTRA: embedding width -> hidden width
        x = backbone.embeddings_project(x)
    D = x.shape[-1]
    x = x.reshape(B * T, D).index_select(0, batch.idx)  # (N, D)
    layers = list(adapter.get(backbone, "layers"))
    kind = type(layers[0]).__name__
    extras = (_position_biases(backbone, layers, T) if kind == MPNET_LAYER
              else _rotary_and_windows(backbone, layers, batch, x) if kind == MODERNBERT_LAYER
              else [None] * len(layers))
    for li, layer in enumerate(layers):
        last = cls_only and li == len(layers) - 1  # from its attention on, the residual stream of CLS only
        step = STEPS.get(type(layer).__name__, _bert_layer)
        x = step(layer, adapter, x, batch, last, extras[li])
    if kind == MODERNBERT_LAYER:  # pre-LayerNorm layers: one LayerNorm after the last
        x = backbone.final_norm(x)
    if cls_only:
        return x
    return x.new_zeros(B * T, D).index_copy(0, batch.idx, x).view(B, T, D)


def _position_biases(backbone: nn.Module, layers: list, T: int) -> list[torch.Tensor]:
    """MPNet: per layer, the relative-position bias its heads add to their scores, (1, heads, T, T), computed once
    for all heads; a physically pruned layer takes its kept heads' (config.kept_heads, as pruned_modeling's
    _SliceBias does)."""
    cfg = backbone.config
    full = backbone.encoder.compute_position_bias(torch.empty(1, T, 0, device=backbone.device))
    kept = getattr(cfg, "kept_heads", None) or [None] * len(layers)
    out = []
    for layer, keep in zip(layers, kept):
        h = getattr(layer.attention.attn, "num_attention_heads", 0)
        out.append(full[:, list(keep)] if keep is not None and h < cfg.num_attention_heads else full)
    return out


def _rotary_and_windows(backbone: nn.Module, layers: list, batch: _Batch, x: torch.Tensor) -> list[tuple]:
    """ModernBERT: per layer, for its attention type, the rotary (cos, sin) at each packed token's position in its
    row, (N, head_dim) each (transformers' positions: 0 … T−1 along the padded row), the keys each query sees —
    the real ones; in a sliding-window layer only those within config.local_attention // 2, inclusive, (B, 1, T, T)
    — and the model's apply_rotary_pos_emb."""
    T = batch.T
    pos = torch.arange(T, device=x.device)
    at = batch.idx % T
    window = (pos[:, None] - pos[None]).abs() <= backbone.config.local_attention // 2
    per_type, rotate = {}, _rotary(layers[0])
    for kind in {layer.attention_type for layer in layers}:
        cos, sin = backbone.rotary_emb(x, pos[None], kind)  # (1, T, d)
        keys = batch.key_mask & window if kind == "sliding_attention" else batch.key_mask
        per_type[kind] = (cos[0].index_select(0, at), sin[0].index_select(0, at), keys, rotate)
    return [per_type[layer.attention_type] for layer in layers]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: int, batch: _Batch, last: bool,
          mask: torch.Tensor, scale: float, dropout_p: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention in the padded (B, nh, T, d) layout of packed queries `q` — (N, nh·d), or with `last` (B, nh·d),
    each sentence's CLS — over the packed keys and values (N, nh·d); `mask` (B, 1, T or 1, T) the keys each query
    sees, `bias` (1, nh, T, T) added to the scores (MPNet); d the head width. Returns the context, (N or B, nh·d)."""
    B, T, idx, nh = batch.B, batch.T, batch.idx, k.shape[-1] // d

    def padded(t: torch.Tensor) -> torch.Tensor:  # (N, nh·d) -> (B, nh, T, d), zeros at padding
        buf = t.new_zeros(B * T, t.shape[-1]).index_copy(0, idx, t)
        return buf.view(B, T, nh, d).transpose(1, 2)

    queries = q.view(B, 1, nh, d).transpose(1, 2) if last else padded(q)
    mask = mask[:, :, :1] if last else mask
    if bias is not None:  # the bias, and the hidden keys as the most negative score (as MPNet's additive mask)
        pad = torch.zeros(mask.shape, dtype=queries.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(queries.dtype).min)
        mask = (bias[:, :, :1] if last else bias).to(queries.dtype) + pad
    ctx = F.scaled_dot_product_attention(queries, padded(k), padded(v), attn_mask=mask, scale=scale,
                                         dropout_p=dropout_p)
    ctx = ctx.transpose(1, 2).reshape(B, -1, nh * d)  # (B, T or 1, nh·d)
    return ctx[:, 0] if last else ctx.reshape(B * T, nh * d).index_select(0, idx)


def _attend(sa: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, x: torch.Tensor, batch: _Batch,
            last: bool, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention of the packed tokens `x` (N, D): every real token a key/value; the queries every token,
    or with `last` each sentence's CLS only. Returns (context, residual): (N, nh·d) and x, or (B, nh·d) and x's
    CLS rows."""
    d = sa.attention_head_size
    keys, values = k(x), v(x)
    if last:
        x = x.index_select(0, batch.starts)  # (B, D)
    ctx = _sdpa(q(x), keys, values, d, batch, last, batch.key_mask, getattr(sa, "scaling", d ** -0.5),
                sa.dropout.p if sa.training else 0.0, bias)
    return ctx, x


def _headless(attention: nn.Module, x: torch.Tensor, batch: _Batch, last: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A physically pruned layer with no heads left (pruned_modeling's stand-in that projects its own output):
    (residual, its output projection's bias) — with `last`, for each sentence's CLS only."""
    x = x.index_select(0, batch.starts) if last else x
    return x, attention(x)[0]


def _bert_layer(layer: nn.Module, adapter, x: torch.Tensor, batch: _Batch, last: bool, bias=None) -> torch.Tensor:
    sa = adapter.get(layer, "attn_self")
    if not hasattr(sa, "query"):  # a physically pruned layer with no heads left: empty context
        x = x.index_select(0, batch.starts) if last else x
        ctx = x.new_zeros(x.shape[0], 0)
    else:
        ctx, x = _attend(sa, sa.query, sa.key, sa.value, x, batch, last)
    a = adapter.get(layer, "attn_output")(ctx, x)
    return adapter.get(layer, "ffn_output")(adapter.get(layer, "intermediate")(a), a)


def _distilbert_layer(layer: nn.Module, adapter, x: torch.Tensor, batch: _Batch, last: bool, bias=None
                      ) -> torch.Tensor:
    att = layer.attention
    if not hasattr(att, "q_lin"):
        x, out = _headless(att, x, batch, last)
    else:
        ctx, x = _attend(att, att.q_lin, att.k_lin, att.v_lin, x, batch, last)
        out = att.out_lin(ctx)
    a = layer.sa_layer_norm(out + x)
    return layer.output_layer_norm(layer.ffn(a) + a)


def _mpnet_layer(layer: nn.Module, adapter, x: torch.Tensor, batch: _Batch, last: bool, bias: torch.Tensor
                 ) -> torch.Tensor:
    sa = layer.attention.attn
    if not hasattr(sa, "q"):
        x, out = _headless(sa, x, batch, last)
    else:
        ctx, x = _attend(sa, sa.q, sa.k, sa.v, x, batch, last, bias)
        out = sa.o(ctx)
    a = layer.attention.LayerNorm(layer.attention.dropout(out) + x)
    return layer.output(layer.intermediate(a), a)


def _modernbert_layer(layer: nn.Module, adapter, x: torch.Tensor, batch: _Batch, last: bool, rope: tuple
                      ) -> torch.Tensor:
    cos, sin, keys, rotate = rope
    attn = layer.attn
    if not hasattr(attn, "Wqkv"):
        x, out = _headless(attn, x, batch, last)
    else:
        d = attn.head_dim
        nh = attn.Wqkv.out_features // (3 * d)
        q, k, v = attn.Wqkv(layer.attn_norm(x)).view(-1, 3, nh, d).unbind(1)  # (N, nh, d) each
        q, k = rotate(q, k, cos, sin, unsqueeze_dim=1)
        if last:
            q, x = q.index_select(0, batch.starts), x.index_select(0, batch.starts)
        ctx = _sdpa(q.flatten(1), k.flatten(1), v.flatten(1), d, batch, last, keys, d ** -0.5,
                    attn.attention_dropout if attn.training else 0.0)
        out = attn.out_drop(attn.Wo(ctx))
    x = x + out
    return x + layer.mlp(layer.mlp_norm(x))


# every other listed layer: _bert_layer
STEPS = {DISTILBERT_LAYER: _distilbert_layer, MPNET_LAYER: _mpnet_layer, MODERNBERT_LAYER: _modernbert_layer}
