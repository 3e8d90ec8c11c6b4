"""Pruning (mask selection, §2.3) and rewinding (reset to pre-trained weights, keep the mask).

Scoring lives in score.py; this module only turns scores into masks and applies them (Torch-Pruning's split).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import SparseCSEError
from .model import Encoder, load_encoder


def count_pruned(sparsity: float, total: int) -> int:
    """round(s·count), halves rounded up (not banker's rounding)."""
    return int(math.floor(sparsity * total + 0.5))


def lowest_mask(scores: np.ndarray, sparsity: float) -> torch.Tensor:
    """1 for kept, 0 for the round(s·n) lowest scores across the whole array; ties broken by flat index."""
    if not 0.0 <= sparsity < 1.0:
        raise SparseCSEError(f"sparsity={sparsity} is outside [0, 1); it is the fraction of units removed")
    flat = np.asarray(scores, dtype=np.float64).ravel()
    k = count_pruned(sparsity, flat.size)
    order = np.lexsort((np.arange(flat.size), flat))  # by score, then by index
    mask = np.ones(flat.size, dtype=np.float32)
    mask[order[:k]] = 0.0
    return torch.from_numpy(mask.reshape(np.shape(scores)))


def select_masks(head_scores: np.ndarray, neuron_scores: np.ndarray, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank heads and neurons separately across all layers; mask the lowest fraction `sparsity` of each."""
    return lowest_mask(head_scores, sparsity), lowest_mask(neuron_scores, sparsity)


@torch.no_grad()
def zero_pruned_weights(enc: Encoder) -> None:
    """Zero every weight that only feeds masked units, so the dense checkpoint equals the masked model."""
    a = enc.adapter
    cfg = enc.backbone.config
    d = cfg.hidden_size // cfg.num_attention_heads
    for li, layer in enumerate(enc.layers):
        for h in torch.nonzero(enc.head_mask[li] == 0).flatten().tolist():
            sl = slice(h * d, (h + 1) * d)
            for name in ("query", "key", "value"):
                lin = a.get(layer, name)
                lin.weight[sl] = 0
                lin.bias[sl] = 0
            a.get(layer, "attn_out").weight[:, sl] = 0
        dead = torch.nonzero(enc.neuron_mask[li] == 0).flatten()
        if dead.numel():
            a.get(layer, "inter_dense").weight[dead] = 0
            a.get(layer, "inter_dense").bias[dead] = 0
            a.get(layer, "ffn_out").weight[:, dead] = 0


def rewind(pretrained: "str | Encoder", head_mask: torch.Tensor, neuron_mask: torch.Tensor, pooler: str = "cls",
           dropout: float | None = None) -> Encoder:
    """Every remaining weight back to its pre-trained value, masks fixed, pruned units' weights zero (§2.3)."""
    enc = pretrained if isinstance(pretrained, Encoder) else load_encoder(pretrained, pooler=pooler, dropout=dropout)
    enc.set_masks(head_mask, neuron_mask)
    zero_pruned_weights(enc)
    return enc


def check_compatible(scores_meta: dict, enc: Encoder, scores_path: str) -> None:
    L, H = enc.head_mask.shape
    inter = enc.neuron_mask.shape[1]
    got = (scores_meta.get("layers"), scores_meta.get("heads"), scores_meta.get("intermediate"))
    if got != (L, H, inter):
        raise SparseCSEError(f"{scores_path}: scores are for an architecture with layers×heads×intermediate = "
                             f"{got[0]}×{got[1]}×{got[2]}, but the model has {L}×{H}×{inter}; score this model first")
