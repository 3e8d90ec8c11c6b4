"""Pruning (mask selection, §2.3) and rewinding (reset to pre-trained weights, keep the mask).

Scoring lives in score.py; this module only turns scores into masks and applies them (Torch-Pruning's split).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .. import SparseCSEError
from .model import Encoder, head_dim, intermediate_size, load_encoder
from .score import magnitude_importance, per_layer_l2, random_importance
from . import pruned_modeling


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


def masks_for(scorer: str, sparsity: float, lam: float, seed: int, *, scores=None, pretrained: Encoder,
              combine: str = "gradient", normalize: str = "none", simcse_scores=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (head, neuron) masks a grid point trains with: the paper's score (`scores` at λ, read as `combine` /
    `normalize` say), or a control at the same sparsity — a seeded random ranking, weight magnitude in the
    pre-trained model, or SimCSE's own InfoNCE Taylor score (`simcse_scores`) — each ranked across layers under
    the same `normalize` reading."""
    if scorer == "align_uniform":
        if scores is None:
            raise SparseCSEError("scorer align_uniform needs the importance scores (scores.parquet)")
        head, neuron = scores.importance(lam, combine, normalize)
    elif scorer in ("random", "magnitude"):  # ranked across layers as the paper's score is (`normalize`)
        head, neuron = (random_importance(*pretrained.head_mask.shape, pretrained.neuron_mask.shape[1], seed)
                        if scorer == "random" else magnitude_importance(pretrained))
        if normalize == "layer":
            head, neuron = per_layer_l2(head), per_layer_l2(neuron)
    elif scorer == "simcse":
        if simcse_scores is None:
            raise SparseCSEError("scorer simcse needs the InfoNCE scores (scores_simcse.parquet)")
        head, neuron = simcse_scores.importance(0.5, "gradient", normalize)
    else:
        raise SparseCSEError(f"scorer {scorer!r}: choose align_uniform, random, magnitude or simcse")
    return select_masks(head, neuron, sparsity)


def unit_params(enc: Encoder) -> tuple[int, int]:
    """(parameters one head owns, parameters one FFN neuron owns) in this backbone: a head its query/key/value rows
    with their biases and its columns of the attention output; a neuron its FFN row(s) (value and gate when gated)
    with their biases and its column of the FFN output. Read off layer 0's modules."""
    cfg, a = enc.backbone.config, enc.adapter
    d, layer = head_dim(cfg), enc.layers[0]
    head = sum(len(rows) * (lin.in_features + (lin.bias is not None))
               for lin, rows in a.head_rows(layer, torch.tensor([0]), d, cfg.num_attention_heads))
    head += d * a.get(layer, "attn_out").out_features
    neuron = sum(len(rows) * (lin.in_features + (lin.bias is not None))
                 for lin, rows in a.neuron_rows(layer, torch.tensor([0]), intermediate_size(cfg)))
    return head, neuron + a.get(layer, "ffn_out").out_features


def encoder_params(enc: Encoder) -> int:
    """Parameters of the backbone once its masked heads and neurons are physically removed (what `physical_prune`
    leaves), from the masks alone (unit_params: for BERT a head is 4·d·hidden + 3·d, a neuron 2·hidden + 1)."""
    per_head, per_neuron = unit_params(enc)
    heads = int((enc.head_mask == 0).sum())
    neurons = int((enc.neuron_mask == 0).sum())
    dense = sum(p.numel() for p in enc.backbone.parameters())
    return dense - heads * per_head - neurons * per_neuron


@torch.no_grad()
def zero_pruned_weights(enc: Encoder) -> None:
    """Zero every weight that only feeds masked units, so the dense checkpoint equals the masked model."""
    a = enc.adapter
    cfg = enc.backbone.config
    d, H, inter = head_dim(cfg), cfg.num_attention_heads, intermediate_size(cfg)
    for li, layer in enumerate(enc.layers):
        dead_h = torch.nonzero(enc.head_mask[li].cpu() == 0).flatten()
        if dead_h.numel():
            for lin, rows in a.head_rows(layer, dead_h, d, H):
                lin.weight[rows] = 0
                if lin.bias is not None:
                    lin.bias[rows] = 0
            a.get(layer, "attn_out").weight[:, (dead_h[:, None] * d + torch.arange(d)).flatten()] = 0
        dead = torch.nonzero(enc.neuron_mask[li].cpu() == 0).flatten()
        if dead.numel():
            for lin, rows in a.neuron_rows(layer, dead, inter):
                lin.weight[rows] = 0
                if lin.bias is not None:
                    lin.bias[rows] = 0
            a.get(layer, "ffn_out").weight[:, dead] = 0


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only the given output rows / input columns of a Linear, in place."""
    w, b = lin.weight.detach(), lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    lin.weight = nn.Parameter(w.clone())
    if b is not None:
        lin.bias = nn.Parameter(b.clone())
    lin.out_features, lin.in_features = w.shape


@torch.no_grad()
def physical_prune(enc: Encoder) -> nn.Module:
    """The masked encoder as a physically smaller SparseCSE<family>Model (pruned_modeling.py): masked heads'
    query/key/value rows (a fused projection's rows in each third) and output-projection columns, masked neurons'
    FFN rows (value and gate rows together when gated) and columns removed, module by module (as Torch-Pruning
    slices). Its output equals the masked encoder's."""
    import copy
    import warnings


    cfg = enc.backbone.config
    if cfg.model_type not in pruned_modeling.CLASSES:
        raise SparseCSEError(f"physical pruning supports {', '.join(sorted(pruned_modeling.CLASSES))}, not "
                             f"{cfg.model_type!r}")
    a, d, H, inter = enc.adapter, head_dim(cfg), cfg.num_attention_heads, intermediate_size(cfg)
    sliced = copy.deepcopy(enc.backbone).cpu()
    heads, neurons, kept = [], [], []
    for li, layer in enumerate(a.get(sliced, "layers")):
        keep_h = torch.nonzero(enc.head_mask[li].cpu() != 0).flatten()
        keep_n = torch.nonzero(enc.neuron_mask[li].cpu() != 0).flatten()
        with warnings.catch_warnings():  # a layer with no heads/neurons left has zero-element weights
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            for lin, rows in a.head_rows(layer, keep_h, d, H):
                _slice_linear(lin, rows=rows)
            _slice_linear(a.get(layer, "attn_out"), cols=(keep_h[:, None] * d + torch.arange(d)).flatten())
            for lin, rows in a.neuron_rows(layer, keep_n, inter):
                _slice_linear(lin, rows=rows)
            _slice_linear(a.get(layer, "ffn_out"), cols=keep_n)
        heads.append(int(keep_h.numel()))
        neurons.append(int(keep_n.numel()))
        kept.append(keep_h.tolist())
    cfg_cls, model_cls = pruned_modeling.CLASSES[cfg.model_type]
    base = {k: v for k, v in cfg.to_dict().items()
            if k not in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")}
    new = model_cls(cfg_cls(heads_per_layer=heads, intermediate_per_layer=neurons, kept_heads=kept, **base))
    new.config.architectures = [model_cls.__name__]
    src, want = sliced.state_dict(), new.state_dict()
    missing = [k for k in want if k not in src or src[k].shape != want[k].shape]
    if missing:
        raise SparseCSEError(f"physical pruning: {missing[0]} does not match the pruned model's shape")
    new.load_state_dict({k: src[k] for k in want})  # projections of a layer with no heads left have no place
    return new.eval()


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
