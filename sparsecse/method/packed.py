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

import torch
import torch.nn.functional as F
from torch import nn

# the layer classes whose sub-modules this forward reimplements (transformers copies ELECTRA's from BERT's)
LAYER_CLASSES = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer")


def _two_arg_forward(module: nn.Module) -> bool:
    """forward(hidden, residual): BertSelfOutput / BertOutput's LayerNorm(dropout(dense(x)) + residual)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params) == 2 and all(hasattr(module, a) for a in ("dense", "LayerNorm", "dropout"))


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
        sa = adapter.get(layer, "attn_self")
        if hasattr(sa, "query"):
            if not (all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value"))
                    and isinstance(getattr(sa, "dropout", None), nn.Dropout)
                    and isinstance(getattr(sa, "scaling", None), float)
                    and isinstance(getattr(sa, "num_attention_heads", None), int)
                    and isinstance(getattr(sa, "attention_head_size", None), int)):
                return f"layer {li}'s self-attention lacks query/key/value/scaling/dropout/head sizes"
        for what in ("attn_output", "ffn_output"):
            if not _two_arg_forward(adapter.get(layer, what)):
                return f"layer {li}'s {what} is not forward(hidden, residual) with dense/LayerNorm/dropout"
    return None


def supports(backbone: nn.Module, adapter) -> bool:
    return why_not(backbone, adapter) is None


def packed_forward(backbone: nn.Module, adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cls_only: bool) -> torch.Tensor:
    """The backbone's encoder on real tokens only; returns CLS states (B, D) or, for `cls_only=False`, (B, T, D)
    with zeros at padding. Only for a backbone that `supports`."""
    B, T = input_ids.shape
    valid = attention_mask.bool()
    idx = valid.reshape(-1).nonzero().squeeze(1)  # packed slot -> flat padded position
    lengths = valid.sum(1)
    starts = torch.cumsum(lengths, 0) - lengths  # packed index of each sentence's first (CLS) token
    x = backbone.embeddings(input_ids=input_ids)  # (B, T, D): word + position + type, LayerNorm, dropout
    if getattr(backbone, "embeddings_project", None) is not None:  # ELECTRA: embedding width -> hidden width
        x = backbone.embeddings_project(x)
    D = x.shape[-1]
    x = x.reshape(B * T, D).index_select(0, idx)  # (N, D)
    key_mask = valid[:, None, None, :]  # (B, 1, 1, T): attend to real tokens only
    layers = list(adapter.get(backbone, "layers"))

    for li, layer in enumerate(layers):
        sa = adapter.get(layer, "attn_self")
        last = cls_only and li == len(layers) - 1
        if not hasattr(sa, "query"):  # a physically pruned layer with no heads left: empty context
            x = x.index_select(0, starts) if last else x
            a = adapter.get(layer, "attn_output")(x.new_zeros(x.shape[0], 0), x)
            x = adapter.get(layer, "ffn_output")(adapter.get(layer, "intermediate")(a), a)
            continue
        nh, d = sa.num_attention_heads, sa.attention_head_size

        def padded(t: torch.Tensor) -> torch.Tensor:  # (N, nh·d) -> (B, nh, T, d), zeros at padding
            buf = t.new_zeros(B * T, t.shape[-1]).index_copy(0, idx, t)
            return buf.view(B, T, nh, d).transpose(1, 2)

        k, v = padded(sa.key(x)), padded(sa.value(x))  # every real token is a key/value
        if last:
            x = x.index_select(0, starts)  # (B, D): from here on, the residual stream of CLS only
            q = sa.query(x).view(B, 1, nh, d).transpose(1, 2)
        else:
            q = padded(sa.query(x))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=sa.scaling,
                                             dropout_p=sa.dropout.p if sa.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(B, -1, nh * d)  # (B, T or 1, nh·d)
        ctx = ctx[:, 0] if last else ctx.reshape(B * T, nh * d).index_select(0, idx)
        a = adapter.get(layer, "attn_output")(ctx, x)
        x = adapter.get(layer, "ffn_output")(adapter.get(layer, "intermediate")(a), a)
    if cls_only:
        return x
    return x.new_zeros(B * T, D).index_copy(0, idx, x).view(B, T, D)
