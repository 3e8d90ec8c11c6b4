"""Every figure sparsecse draws, each a `matplotlib.figure.Figure` built from data (no pyplot, no global backend):
STS vs sparsity (the paper's Figures 4–5), alignment vs uniformity (Figure 3), the selected mask per layer, the
Pareto front, the pilot study (Figure 1). `png` turns one into bytes. Tests read the plotted data back."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from ..core.results import PAPER_SCORER, TrialResult
from ..core.tables import label
from .pilot import row_method
from .select import Sampled, Selection, sampled_points, sts_curves


def png(fig: Figure) -> bytes:
    """A figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _finish(fig: Figure, ax, xlabel: str, ylabel: str, legend_size: int) -> Figure:
    """Axis labels, legend and grid of a single-panel figure, laid out."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _scatter(ax, sampled: Sampled | None) -> None:
    """Sampled points (sweep.search=optuna): test score vs sparsity coloured by λ, and the search's trend."""
    if sampled is None:
        return
    sc = ax.scatter([100 * x for x in sampled.sparsity], sampled.score, c=sampled.lam, cmap="viridis",
                    label="sampled trials")
    ax.figure.colorbar(sc, ax=ax, label="λ")
    if sampled.trend:
        xs, ys = sampled.trend
        ax.plot([100 * x for x in xs], ys, color="black", lw=1, label="quadratic fit (log s)")
    ax.set_xscale("log")


def _sts_panel(ax, done: list[TrialResult], task: str, sampled: bool) -> None:
    """One task's test score vs sparsity: a curve per method (mean ± sample std over seeds, each starting at the
    s = 0 control), or the sampled scatter; the control as a dashed line."""
    curves, ctrl = sts_curves(done, task)
    if sampled:
        _scatter(ax, sampled_points(done, task))
    for c in ([] if sampled else curves):
        ax.errorbar([100 * x for x in c.sparsity], c.mean, yerr=c.std, marker="o", capsize=3, label=c.label,
                    ls="-" if c.paper else ":")
    if ctrl is not None:
        ax.axhline(ctrl, color="grey", ls="--", lw=1, label="rewound SimCSE (s=0)")
    ax.set_xlabel("sparsity (%)")
    ax.set_title("STS average" if task == "avg" else label(task))
    ax.grid(alpha=0.3)


def sts_average(done: list[TrialResult], sampled: bool = False) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    _sts_panel(ax, done, "avg", sampled)
    ax.set_ylabel("Spearman × 100")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sts_tasks(done: list[TrialResult], tasks: list[str], sampled: bool = False) -> Figure:
    n = len(tasks)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        _sts_panel(ax, done, t, sampled)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def align_uniform(done: list[TrialResult], baseline: dict | None, backbone: dict | None) -> Figure | None:
    """The paper's Figure 3: alignment vs uniformity (both lower = better) per trial, coloured by the STS average,
    with the stage-1 SimCSE and the pre-trained backbone as stars; None when no trial reported both."""
    au = [r for r in done if r.metrics.get("align") is not None and r.metrics.get("uniform") is not None]
    if not au:
        return None
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    sc = None
    for scorer, marker in ((PAPER_SCORER, "o"), ("random", "x"), ("magnitude", "^"), ("simcse", "s")):
        pts = [r for r in au if r.point.scorer == scorer]
        if pts:
            sc = ax.scatter([r.metrics["uniform"] for r in pts], [r.metrics["align"] for r in pts],
                            c=[r.test("avg", np.nan) for r in pts], cmap="viridis", marker=marker,
                            label=scorer if scorer != PAPER_SCORER else "SparseCSE trials (s = 0: control)")
    for ref, name, color in ((baseline, "SimCSE stage 1", "red"), (backbone, "pre-trained backbone", "black")):
        if ref and ref.get("align") is not None:
            ax.scatter([ref["uniform"]], [ref["align"]], marker="*", s=160, c=color, label=name)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="STS test avg")
    return _finish(fig, ax, "uniformity (lower is better)", "alignment (lower is better)", 7)


def sweep_figures(results: list[TrialResult], tasks: list[str], baseline: dict | None = None,
                  backbone: dict | None = None, sampled: bool = False) -> dict[str, Figure]:
    """{file name: figure} of a sweep's evaluated trials: the STS average and each task vs sparsity (one curve per
    λ of the paper's score and per control method, ± sample std over seeds; with `sampled` points of
    sweep.search=optuna a scatter coloured by λ and a quadratic fit in log sparsity), and alignment vs uniformity."""
    done = [r for r in results if not r.error and r.evaluated]
    if not done:
        return {}
    out = {"sts_avg_vs_sparsity.png": sts_average(done, sampled)}
    per = [t for t in tasks if t != "avg"]
    if per:
        out["sts_tasks_vs_sparsity.png"] = sts_tasks(done, per, sampled)
    au = align_uniform(done, baseline, backbone)
    if au is not None:
        out["align_uniform.png"] = au
    return out


def allocation(alloc: dict, title: str) -> Figure:
    """A 2 × layers heat map of the fraction of heads / FFN neurons pruned per layer (select.allocation)."""
    grid = np.array([alloc["heads"], alloc["neurons"]])
    fig = Figure(figsize=(1.0 + 0.55 * grid.shape[1], 1.9))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks([0, 1], ["heads", "neurons"])
    ax.set_xticks(range(grid.shape[1]), [str(i) for i in range(grid.shape[1])])
    ax.set_xlabel("layer")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def pareto(points: list[dict], selected: Selection) -> Figure:
    """Every candidate point's dev vs encoder parameters (select.candidate_points), the front, the δ band and the
    chosen point (sweep.objective=pareto)."""
    par = selected.pareto
    pts = [p for p in points if p["params"] is not None]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.scatter([p["params"] / 1e6 for p in pts if not p["control"]], [p["dev"] for p in pts if not p["control"]],
               c="tab:blue", s=18, label="grid points (mean over seeds)")
    ax.scatter([p["params"] / 1e6 for p in pts if p["control"]], [p["dev"] for p in pts if p["control"]], c="grey",
               marker="s", label="s = 0 control")
    front = par["front"]
    ax.plot([f["params"] / 1e6 for f in front], [f["dev"] for f in front], "-o", color="tab:orange", label="Pareto front")
    ax.axhspan(par["best_dev"] - par["delta"], par["best_dev"], color="tab:green", alpha=0.12,
               label=f"within δ = {par['delta']:g} of the best dev")
    ax.scatter([selected.params / 1e6], [selected.dev_mean], marker="*", s=220, c="red", label="selected", zorder=3)
    return _finish(fig, ax, "encoder parameters (millions, after physical pruning)", "STS-B dev Spearman × 100", 7)


def pilot(rows: list[dict]) -> Figure:
    """The pilot study (pilot.pilot rows): the STS average vs sparsity, one curve per mask-choosing method."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for method in dict.fromkeys(row_method(r) for r in rows):
        pts = [r for r in rows if row_method(r) == method]
        ax.plot([100 * r["sparsity"] for r in pts], [r["avg"] for r in pts], marker="o", label=method)
    ax.set_title("pilot: the trained SimCSE pruned, no retraining", fontsize=9)
    return _finish(fig, ax, "sparsity (%)", "STS avg (Spearman × 100)", 8)
