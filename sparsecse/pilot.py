"""The pilot study (SparseCSE Figure 1): prune the *trained* SimCSE model at each sparsity — no rewinding, no
retraining — and evaluate STS. Cheap (no training), it shows how much of the model each scorer can remove before
STS falls, and whether the paper's score beats random and magnitude masks at removing the right units."""

from __future__ import annotations

from pathlib import Path

from .config import STS_TASKS, ScoreConfig, method_name
from .prune import masks_for


def pilot(enc, scores, data_dir: Path, sparsities, lam: float = 0.5, scorers=("align_uniform",), seed: int = 0,
          readings=ScoreConfig().allocations, tasks=STS_TASKS, batch_size: int = 128,
          pooler: str | None = None, simcse_scores=None) -> list[dict]:
    """One row per (scorer, reading, sparsity): {scorer, method, sparsity, lam, task: Spearman × 100, …, avg}.
    `readings(scorer)` lists the (combine, normalize) readings to prune with (ScoreConfig.allocations). `enc` is
    the trained model the scores were computed on; its masks are set per point and restored to all-ones at the end."""
    import torch

    from .evaluate import evaluate_sts

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
                        res = evaluate_sts(enc, data_dir, tasks=tuple(tasks), batch_size=batch_size, pooler=pooler)
                        unpruned = res if s == 0 else unpruned
                    rows.append({"scorer": scorer, "method": method_name(scorer, combine, normalize),
                                 "sparsity": float(s), "lam": lam if scorer == "align_uniform" else None, **res})
    finally:
        enc.set_masks(torch.ones_like(enc.head_mask), torch.ones_like(enc.neuron_mask))
    return rows


def render(rows: list[dict], tasks) -> tuple[str, bytes]:
    """(markdown table, PNG of the STS average vs sparsity, one curve per scorer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tables import label, png, render as table

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in dict.fromkeys(_method(r) for r in rows):
        pts = [r for r in rows if _method(r) == method]
        ax.plot([100 * r["sparsity"] for r in pts], [r["avg"] for r in pts], marker="o", label=method)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("STS avg (Spearman × 100)")
    ax.set_title("pilot: the trained SimCSE pruned, no retraining", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    cols = [t for t in (*tasks, "avg") if t in rows[0]]
    md = table(["mask chosen by", "sparsity", *map(label, cols)],
               [[_method(r), f"{r['sparsity']:.0%}", *(r[t] for t in cols)] for r in rows], left=2)
    return md, png(fig)


def _method(row: dict) -> str:
    return row.get("method", row["scorer"])  # pilot.json files written before the readings were a dimension


def sparsities_with_zero(sparsities) -> list[float]:
    return sorted({0.0, *map(float, sparsities)})
