"""The pilot study (SparseCSE Figure 1): prune the *trained* SimCSE model at each sparsity — no rewinding, no
retraining — and evaluate STS. Cheap (no training), it shows how much of the model each scorer can remove before
STS falls, and whether the paper's score beats random and magnitude masks at removing the right units."""

from __future__ import annotations

from pathlib import Path

from ..core.config import STS_TASKS, ScoreConfig
from ..core.results import method_name, upgrade_record
from ..method.evaluate import evaluate_sts
from ..method.prune import masks_for


def pilot(enc, scores, data_dir: Path, sparsities, lam: float = 0.5, scorers=("align_uniform",), seed: int = 0,
          readings=ScoreConfig().allocations, simcse_scores=None, sts: dict | None = None) -> list[dict]:
    """One row per (scorer, reading, sparsity): {scorer, method, sparsity, lam, task: Spearman × 100, …, avg}.
    `readings(scorer)` lists the (combine, normalize) readings to prune with (ScoreConfig.allocations). `enc` is
    the trained model the scores were computed on; its masks are set per point and restored to all-ones at the end.
    `sts`: evaluate_sts's options (tasks — default all seven —, batch_size, pooler)."""
    import torch


    rows, unpruned = [], None
    try:
        for scorer in scorers:
            for combine, normalize in readings(scorer):
                for s in sorted(sparsities):
                    if s == 0 and unpruned:  # nothing masked: the same model for every scorer and reading
                        res = unpruned
                    else:
                        hm, nm = masks_for(scorer, s, lam, seed, scores=scores, pretrained=enc, combine=combine,
                                           normalize=normalize, simcse_scores=simcse_scores)
                        enc.set_masks(hm, nm)
                        res = evaluate_sts(enc, data_dir, **{"tasks": STS_TASKS, **(sts or {})})
                        unpruned = res if s == 0 else unpruned
                    rows.append({"scorer": scorer, "method": method_name(scorer, combine, normalize),
                                 "sparsity": float(s), "lam": lam if scorer == "align_uniform" else None, **res})
    finally:
        enc.set_masks(torch.ones_like(enc.head_mask), torch.ones_like(enc.neuron_mask))
    return rows


def row_method(row: dict) -> str:
    """How a pilot row's mask was chosen (its method)."""
    return upgrade_record("pilot_row", row)["method"]


def sparsities_with_zero(sparsities) -> list[float]:
    return sorted({0.0, *map(float, sparsities)})
