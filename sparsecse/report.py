"""Selection on STS-B dev and the sweep report, as pure functions: rows of trial results in, a choice or rendered
bytes/text out (results table, report.md, report.html, figure PNGs). The driver (sweep.py) writes them to storage.

A row is {"config": {"sparsity", "lam", "seed"}, "metrics": {...last reported...}, "error": str | None,
"checkpoint": the trial's last checkpoint relative to the run (its best dev model is `<checkpoint>/best`)}."""

from __future__ import annotations

import base64
import html
import math

import numpy as np

from .config import STS_TASKS, Config
from .tables import label, render
from .stages import point_name


def select(rows: list[dict]) -> dict | None:
    """The (sparsity, λ) with the highest STS-B dev Spearman averaged over seeds — never test.

    Only finished trials count; pruned points (sparsity > 0) are preferred over the rewound control when any exist.
    Ties go to the lower sparsity, then the lower λ.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        m = r["metrics"]
        if r["error"] or not m.get("done") or not math.isfinite(m.get("best_stsb_dev", float("nan"))):
            continue
        groups.setdefault((r["config"]["sparsity"], r["config"]["lam"]), []).append(r)
    if not groups:
        return None
    pruned = {k: v for k, v in groups.items() if k[0] > 0} or groups
    key = max(pruned, key=lambda k: (np.mean([r["metrics"]["best_stsb_dev"] for r in pruned[k]]), -k[0], -k[1]))
    members = pruned[key]
    return {"sparsity": key[0], "lam": key[1], **_seed_stats(members)}


def sample_std(xs) -> float | None:
    """Sample standard deviation (ddof = 1) over seeds; None with fewer than two (no spread to show)."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else None


def _seed_stats(members: list[dict]) -> dict:
    """Mean and sample std over seeds of the dev score and every test task of one grid point's trials; the
    best-dev seed's checkpoint is the one to export."""
    best_seed = max(members, key=lambda r: r["metrics"]["best_stsb_dev"])
    test = {t: float(np.mean([r["metrics"][f"test/{t}"] for r in members])) for t in _test_keys(members)}
    return {"dev_mean": float(np.mean([r["metrics"]["best_stsb_dev"] for r in members])),
            "seeds": [r["config"]["seed"] for r in members], "test": test,
            "test_std": {t: sample_std([r["metrics"][f"test/{t}"] for r in members]) for t in _test_keys(members)},
            "trial": point_name(best_seed["config"]), "checkpoint": best_seed.get("checkpoint")}


def control(rows: list[dict]) -> dict | None:
    """The rewound SimCSE control (sparsity 0, retrained per seed) over its finished seeds: SimCSE's seed spread."""
    members = [r for r in rows if not r["error"] and r["metrics"].get("done") and r["config"]["sparsity"] == 0
               and math.isfinite(r["metrics"].get("best_stsb_dev", float("nan")))]
    if not members:
        return None
    # one control per seed: with several λ values in the grid the s = 0 point is run once per seed
    by_seed: dict = {}
    for r in sorted(members, key=lambda r: r["config"]["lam"]):
        by_seed.setdefault(r["config"]["seed"], r)
    return _seed_stats([by_seed[k] for k in sorted(by_seed)])


def _pm(mean: dict, std: dict, tasks: list[str]) -> dict:
    return {t: f"{mean[t]:.2f}" + (f" ± {std[t]:.2f}" if std[t] is not None else "")
            for t in tasks if t in mean and t in std}


def _test_keys(rows) -> list[str]:
    keys = [k[5:] for k in rows[0]["metrics"] if k.startswith("test/")]
    return [t for t in STS_TASKS if t in keys] + (["avg"] if "avg" in keys else [])


def _table(rows: list[tuple[str, dict]], tasks: list[str]) -> str:
    return render(["Model", *map(label, tasks)], [[name, *(v.get(t) for t in tasks)] for name, v in rows])


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def render_figures(rows: list[dict], tasks: list[str]) -> dict[str, bytes]:
    """{file name: PNG}: the STS average, and each task, vs sparsity, one curve per λ (± sample std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r["error"] and r["metrics"].get("done")]
    lams = sorted({r["config"]["lam"] for r in done if r["config"]["sparsity"] > 0})
    ctrl = [r for r in done if r["config"]["sparsity"] == 0]
    out = {}

    def curve(ax, task):
        for lam in lams:
            pts = {}
            for r in done:
                if r["config"]["lam"] == lam or r["config"]["sparsity"] == 0:
                    pts.setdefault(r["config"]["sparsity"], []).append(r["metrics"].get(f"test/{task}", np.nan))
            xs = sorted(pts)
            # mean over seeds; the bar is ± one sample std over seeds (none with a single seed)
            ax.errorbar([100 * x for x in xs], [np.mean(pts[x]) for x in xs],
                        yerr=[sample_std(pts[x]) or 0.0 for x in xs],
                        marker="o", capsize=3, label=f"λ={lam}")
        if ctrl:
            ax.axhline(np.mean([r["metrics"].get(f"test/{task}", np.nan) for r in ctrl]), color="grey", ls="--",
                       lw=1, label="rewound SimCSE (s=0)")
        ax.set_xlabel("sparsity (%)")
        ax.set_title("STS average" if task == "avg" else label(task))
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(6, 4))
    curve(ax, "avg")
    ax.set_ylabel("Spearman × 100")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["sts_avg_vs_sparsity.png"] = _png(fig)
    per = [t for t in tasks if t != "avg"]
    if per:
        n = len(per)
        cols = min(4, n)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.4 * cols, 2.8 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax, t in zip(axes.flat, per):
            curve(ax, t)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        out["sts_tasks_vs_sparsity.png"] = _png(fig)
    return out


def results_table(rows: list[dict], tasks: list[str]) -> list[dict]:
    """One flat record per trial (results.parquet / results.json), sorted by (sparsity, λ, seed)."""
    flat = []
    for r in rows:
        m = r["metrics"]
        flat.append({**{k: r["config"].get(k) for k in ("sparsity", "lam", "seed")}, "trial": point_name(r["config"]),
                     "status": "error" if r["error"] else ("done" if m.get("done") else "incomplete"),
                     "error": r["error"] or "", "best_stsb_dev": m.get("best_stsb_dev"),
                     **{f"test/{t}": m.get(f"test/{t}") for t in tasks},
                     "align": m.get("align"), "uniform": m.get("uniform"), "steps": m.get("step"),
                     "node_id": m.get("node_id"), "checkpoint": r.get("checkpoint")})
    flat.sort(key=lambda x: (x["sparsity"], x["lam"], x["seed"]))
    return flat


def parquet_bytes(flat: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(flat), buf)
    return buf.getvalue()


def render_markdown(title: str, cfg: Config, rows: list[dict], flat: list[dict], selected: dict | None,
                    ctrl: dict | None, baseline: dict, transfer: dict | None, figures: list[str]) -> str:
    """report.md: the paper's Table 1 (baseline, dev-selected SparseCSE, test-selected best per task), the
    over-seeds table, alignment/uniformity, every trial, transfer, figures."""
    tasks = [t for t in cfg.eval.tasks if t in STS_TASKS] + ["avg"]
    failed = sum(x["status"] == "error" for x in flat)
    done = [r for r in rows if not r["error"] and r["metrics"].get("done")]
    trow = [("SimCSE (stage 1, " + cfg.model.name + ")", baseline)]
    if selected:
        trow.append((f"SparseCSE, dev-selected (s={selected['sparsity']:.0%}, λ={selected['lam']})", selected["test"]))
    if done:
        best_per = {t: max(r["metrics"].get(f"test/{t}", -1e9) for r in done) for t in tasks}
        trow.append(("best per task over the grid (test-selected, for reference only)", best_per))
    md = [f"# SparseCSE sweep report — {title}", "",
          f"Backbone `{cfg.model.name}`; grid sparsity {list(cfg.sweep.sparsities)} × λ {list(cfg.sweep.lams)} × "
          f"seeds {list(cfg.sweep.seeds)} ({len(flat)} trials, {failed} failed). "
          "Selection uses STS-B **dev** (mean over seeds); test figures are reported, never used to choose.", "",
          "## Test results (Spearman × 100)", "", _table(trow, tasks), ""]
    if selected and len(selected["seeds"]) > 1:
        seeds_rows = []
        if ctrl:
            seeds_rows.append((f"SimCSE (rewound control s=0, seeds {ctrl['seeds']})",
                               _pm(ctrl["test"], ctrl["test_std"], tasks)))
        seeds_rows.append((f"SparseCSE dev-selected (s={selected['sparsity']:.0%}, λ={selected['lam']}, seeds "
                           f"{selected['seeds']})", _pm(selected["test"], selected["test_std"], tasks)))
        md += [f"## Over seeds: mean ± sample std (ddof = 1, n = {len(selected['seeds'])}; test Spearman × 100)", "",
               "Both rows retrain from the pre-trained weights with each seed under the same budget; the control keeps "
               "every head and neuron (sparsity 0), so the difference is the effect of the mask.", "",
               _table(seeds_rows, tasks), ""]
    md += ["## Alignment / uniformity (STS-B test; lower is better)", "",
           f"SimCSE: align {baseline['align']:.4f}, uniform {baseline['uniform']:.4f}", ""]
    g = lambda v: None if v is None else f"{v:.4f}"  # noqa: E731
    md += ["## All trials", "", render(
        ["sparsity", "λ", "seed", "status", "STS-B dev", "test avg", "align", "uniform"],
        [[x["sparsity"], str(x["lam"]), str(x["seed"]), f"{x['status']} {x['error'][:60]}", x["best_stsb_dev"],
          x["test/avg"], g(x["align"]), g(x["uniform"])] for x in flat], left=0)]
    if transfer:
        from .transfer import format_transfer_markdown

        md += ["", "## Transfer tasks (accuracy)", "", format_transfer_markdown(transfer)]
    md += ["" + line for name in figures for line in ("", f"![{name[:-4]}](figures/{name})")]
    return "\n".join(md) + "\n"


def render_html(md_text: str, figures: dict[str, bytes]) -> str:
    """report.html: the markdown as preformatted text with the figures inlined (one self-contained file)."""
    imgs = "".join(f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{name}"><br>'
                   for name, png in figures.items())
    return ("<!doctype html><meta charset=utf-8><title>SparseCSE report</title>"
            f"<pre style='font:14px monospace'>{html.escape(md_text)}</pre>{imgs}")
