"""The padding-free encoder forward: BERT-style layers run on the real tokens of a batch only.

The same modules and weights as `backbone(...)` (mask hooks included), but the per-token work — Q/K/V and output
projections, FFN, LayerNorms — runs on the N real tokens instead of B·T padded slots, and with `cls_only` the last
layer computes its query, output projection and FFN for the CLS token alone (nothing else reaches a CLS pooler).
Only attention itself sees the padded (B, heads, T, d) layout. Equal to the padded forward up to float rounding
(tests/test_packed.py), and to dropout's random draws.

It calls the layer's sub-modules directly, so it relies on how transformers builds them. `why_not(backbone, adapter)`
checks each of those assumptions on the loaded model; anything it does not recognise (another layer class, a
decoder, cross-attention, relative positions, a chunked FFN) runs the backbone's own forward instead.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# the layer classes whose sub-modules this forward reimplements: BERT's and those transformers copies from it
# (ELECTRA's included), and DistilBERT's TransformerBlock (the same post-LayerNorm layer under other names)
BERT_LAYERS = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer")
DISTILBERT_LAYER = "TransformerBlock"
LAYER_CLASSES = (*BERT_LAYERS, DISTILBERT_LAYER)


def _two_arg_forward(module: nn.Module) -> bool:
    """forward(hidden, residual): BertSelfOutput / BertOutput's LayerNorm(dropout(dense(x)) + residual)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) == 2 and all(hasattr(module, a) for a in ("dense", "LayerNorm", "dropout"))


def _attention_ok(sa: nn.Module, q: str, k: str, v: str, heads: str) -> bool:
    return (all(isinstance(getattr(sa, n, None), nn.Linear) for n in (q, k, v))
            and isinstance(getattr(sa, "dropout", None), nn.Dropout)
            and isinstance(getattr(sa, "scaling", None), float)
            and isinstance(getattr(sa, heads, None), int)
            and isinstance(getattr(sa, "attention_head_size", None), int))


def _layer_why_not(li: int, layer: nn.Module, adapter) -> str | None:
    if type(layer).__name__ == DISTILBERT_LAYER:
        att, ffn = layer.attention, layer.ffn
        if hasattr(att, "q_lin") and not (_attention_ok(att, "q_lin", "k_lin", "v_lin", "n_heads")
                                          and isinstance(getattr(att, "out_lin", None), nn.Linear)):
            return f"layer {li}'s attention lacks q_lin/k_lin/v_lin/out_lin/scaling/dropout/head sizes"
        if not (all(isinstance(getattr(layer, n, None), nn.LayerNorm) for n in ("sa_layer_norm", "output_layer_norm"))
                and all(isinstance(getattr(ffn, n, None), nn.Linear) for n in ("lin1", "lin2"))):
            return f"layer {li} is not DistilBERT's attention, sa_layer_norm, ffn(lin1, lin2), output_layer_norm"
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
    for li, layer in enumerate(adapter.get(backbone, "layers")):
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
    for li, layer in enumerate(layers):
        last = cls_only and li == len(layers) - 1  # from its attention on, the residual stream of CLS only
        step = _distilbert_layer if type(layer).__name__ == DISTILBERT_LAYER else _bert_layer
        x = step(layer, adapter, x, batch, last)
    if cls_only:
        return x
    return x.new_zeros(B * T, D).index_copy(0, batch.idx, x).view(B, T, D)


def _attend(sa: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, nh: int, x: torch.Tensor, batch: _Batch,
            last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention of the packed tokens `x` (N, D): every real token a key/value; the queries every token,
    or with `last` each sentence's CLS only. Returns (context, residual): (N, nh·d) and x, or (B, nh·d) and x's
    CLS rows."""
    B, T, idx, d = batch.B, batch.T, batch.idx, sa.attention_head_size

    def padded(t: torch.Tensor) -> torch.Tensor:  # (N, nh·d) -> (B, nh, T, d), zeros at padding
        buf = t.new_zeros(B * T, t.shape[-1]).index_copy(0, idx, t)
        return buf.view(B, T, nh, d).transpose(1, 2)

    keys, values = padded(k(x)), padded(v(x))
    if last:
        x = x.index_select(0, batch.starts)  # (B, D)
        queries = q(x).view(B, 1, nh, d).transpose(1, 2)
    else:
        queries = padded(q(x))
    ctx = F.scaled_dot_product_attention(queries, keys, values, attn_mask=batch.key_mask, scale=sa.scaling,
                                         dropout_p=sa.dropout.p if sa.training else 0.0)
    ctx = ctx.transpose(1, 2).reshape(B, -1, nh * d)  # (B, T or 1, nh·d)
    return (ctx[:, 0] if last else ctx.reshape(B * T, nh * d).index_select(0, idx)), x


def _bert_layer(layer: nn.Module, adapter, x: torch.Tensor, batch: _Batch, last: bool) -> torch.Tensor:
    sa = adapter.get(layer, "attn_self")
    if not hasattr(sa, "query"):  # a physically pruned layer with no heads left: empty context
        x = x.index_select(0, batch.starts) if last else x
        ctx = x.new_zeros(x.shape[0], 0)
    else:
        ctx, x = _attend(sa, sa.query, sa.key, sa.value, sa.num_attention_heads, x, batch, last)
    a = adapter.get(layer, "attn_output")(ctx, x)
    return adapter.get(layer, "ffn_output")(adapter.get(layer, "intermediate")(a), a)


def _distilbert_layer(layer: nn.Module, adapter, x: torch.Tensor, batch: _Batch, last: bool) -> torch.Tensor:
    att = layer.attention
    if not hasattr(att, "q_lin"):  # a physically pruned layer with no heads left: its output projection's bias
        x = x.index_select(0, batch.starts) if last else x
        out = att(x)[0]
    else:
        ctx, x = _attend(att, att.q_lin, att.k_lin, att.v_lin, att.n_heads, x, batch, last)
        out = att.out_lin(ctx)
    a = layer.sa_layer_norm(out + x)
    return layer.output_layer_norm(layer.ffn(a) + a)
