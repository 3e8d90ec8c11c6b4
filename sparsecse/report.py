"""Selection on STS-B dev and the sweep report, as pure functions: rows of trial results in, a choice or rendered
bytes/text out (results table, report.md, report.html, figure PNGs). The driver (sweep.py) writes them to storage.

A row is {"config": {"sparsity", "lam", "seed"}, "metrics": {...last reported...}, "error": str | None,
"checkpoint": the trial's last checkpoint relative to the run (its best dev model is `<checkpoint>/best`)}."""

from __future__ import annotations

import base64
import html
import math

import numpy as np

from . import SparseCSEError
from .config import CONTROL_SCORERS, STS_TASKS, Config, method_name
from .tables import label, png, render
from .stages import point_name
from .stats import bootstrap_diff, paired, sample_std


def evaluated(m: dict) -> bool:
    """A trial's last report is its final test evaluation. ("evaluated": Tune sets its own "done" on the last
    result of a trial it stops early; sweeps before "evaluated" existed reported "done" only there.)"""
    return bool(m.get("evaluated", m.get("done")))


def _finished(r: dict) -> bool:
    m = r["metrics"]
    return not r["error"] and evaluated(m) and math.isfinite(m.get("best_stsb_dev", float("nan")))


def _scorer(r: dict) -> str:
    return r["config"].get("scorer", "align_uniform")


def _reading(r: dict) -> tuple[str, str]:
    """(score.combine, score.normalize) the trial's mask was ranked under."""
    c = r["config"]
    return c.get("combine", "gradient"), c.get("normalize", "none")


def _reading_order(rd: tuple[str, str]) -> tuple:
    return (rd[0] != "gradient", rd[1] != "none", rd)  # the default reading first


def _method(r: dict) -> str:
    return method_name(_scorer(r), *_reading(r))


def _point_key(r: dict) -> tuple:
    """One grid point of the paper's score, seeds pooled: (sparsity, λ, combine, normalize); the s = 0 control
    (nothing masked, so no λ or reading) is one point."""
    c = r["config"]
    return (0.0, 0.0, "", "") if c["sparsity"] == 0 else (c["sparsity"], c["lam"], *_reading(r))


def _candidates(rows: list[dict], select_lam: float | None) -> dict[tuple, list[dict]]:
    """The grid points selection may choose, seeds pooled: the paper's score (λ = `select_lam` only, when set) and
    the s = 0 control; the control scorers (random, magnitude, simcse) never."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        c = r["config"]
        if not _finished(r) or _scorer(r) != "align_uniform":
            continue
        if c["sparsity"] > 0 and select_lam is not None and c["lam"] != select_lam:
            continue
        groups.setdefault(_point_key(r), []).append(r)
    return groups


def _dev(members: list[dict]) -> float:
    return float(np.mean([r["metrics"]["best_stsb_dev"] for r in members]))


def _params(members: list[dict]) -> int | None:
    p = members[0]["metrics"].get("encoder_params")  # trials of sweeps before it was reported lack it
    return None if p is None else int(p)


def select(rows: list[dict], select_lam: float | None = None, objective: str = "dev",
           delta: float = 0.5) -> dict | None:
    """The grid point to export, chosen on STS-B dev Spearman averaged over seeds — never test — among the paper's
    points (scorer align_uniform; λ = `select_lam` only, when set) **and the s = 0 control**: when the control is
    chosen, pruning did not help and the selection says so (`control_won`). The control scorers are never selected.
    Each reading of the scores (score.combine × score.normalize) is a grid point of its own.

    objective "dev": the highest dev; ties go to the lower sparsity (the control first), then the lower λ.
    objective "pareto": the smallest encoder (fewest parameters) whose dev is within `delta` of the best dev; ties
    go to the higher dev. The result then carries the Pareto front of (dev ↑, parameters ↓) as `pareto`."""
    groups = _candidates(rows, select_lam)
    if not groups:
        return None
    order = sorted(groups, key=lambda k: (k[0], k[1], _reading_order(k[2:])))
    best = max(order, key=lambda k: (_dev(groups[k]), -k[0], -k[1]))
    pareto = None
    if objective == "pareto":
        if any(_params(g) is None for g in groups.values()):
            raise SparseCSEError("sweep.objective=pareto: trials of this run did not report encoder_params (they ran "
                                 "before it existed); rerun them, or select with sweep.objective=dev")
        top = _dev(groups[best])
        key = min((k for k in order if _dev(groups[k]) >= top - delta),
                  key=lambda k: (_params(groups[k]), -_dev(groups[k])))
        pareto = {"delta": delta, "best_dev": top, "front": pareto_front(
            [{"key": k, "dev": _dev(groups[k]), "params": _params(groups[k])} for k in order])}
    else:
        key = best
    members = groups[key]
    combine, normalize = _reading(members[0])
    out = {"sparsity": key[0], "lam": members[0]["config"]["lam"], "combine": combine, "normalize": normalize,
           "method": method_name("align_uniform", combine, normalize), "control_won": key[0] == 0,
           "candidates": len(groups), "objective": objective, "params": _params(members), **_seed_stats(members)}
    if pareto:
        out["pareto"] = {**pareto, "front": [_front_row(p["key"], groups[p["key"]], p, p["key"] == key)
                                             for p in pareto["front"]]}
    return out


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point dominates (dev at least as high and parameters at most as many, one of them
    strictly), by parameters ascending."""
    front = [p for p in points if not any(
        q["dev"] >= p["dev"] and q["params"] <= p["params"] and (q["dev"] > p["dev"] or q["params"] < p["params"])
        for q in points)]
    return sorted(front, key=lambda p: (p["params"], -p["dev"]))


def _front_row(key: tuple, members: list[dict], p: dict, chosen: bool) -> dict:
    test = _seed_stats(members)["test"]
    return {"sparsity": key[0], "lam": members[0]["config"]["lam"], "method": _method(members[0]), "dev": p["dev"],
            "params": p["params"], "test_avg": test.get("avg"), "seeds": len(members), "selected": chosen}


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
    members = [r for r in rows if _finished(r) and r["config"]["sparsity"] == 0]
    if not members:
        return None
    # one control per seed: with several λ values in the grid the s = 0 point is run once per seed
    by_seed: dict = {}
    for r in sorted(members, key=lambda r: r["config"]["lam"]):
        by_seed.setdefault(r["config"]["seed"], r)
    return _seed_stats([by_seed[k] for k in sorted(by_seed)])


def comparisons(rows: list[dict], select_lam: float | None = None, metric: str = "test/avg",
                predictions: dict | None = None) -> list[dict]:
    """At every sparsity > 0, each mask-choosing method at the same retraining budget — the paper's score under
    each reading (at the λ best on dev at that sparsity, or `select_lam`), random, magnitude, simcse — with
    `metric` over seeds, paired against the s = 0 control and against random (same normalize reading when run).
    Where only one seed is shared, `predictions` ({trial name: per-pair test predictions}) give a paired bootstrap
    over test pairs instead of no claim."""
    fin = [r for r in rows if _finished(r)]
    val = lambda r: (r["metrics"][metric], point_name(r["config"]))  # noqa: E731
    ctrl = {r["config"]["seed"]: val(r) for r in fin if r["config"]["sparsity"] == 0}
    out = []
    for sp in sorted({r["config"]["sparsity"] for r in fin if r["config"]["sparsity"] > 0}):
        at = [r for r in fin if r["config"]["sparsity"] == sp]
        by_method: dict[str, list[dict]] = {}
        for scorer in ("align_uniform", *CONTROL_SCORERS):
            mine = [r for r in at if _scorer(r) == scorer]
            for rd in sorted({_reading(r) for r in mine}, key=_reading_order):
                members = [r for r in mine if _reading(r) == rd]
                if scorer == "align_uniform":
                    lams = sorted({r["config"]["lam"] for r in members})
                    lam = select_lam if select_lam in lams else max(lams, key=lambda x: np.mean(
                        [r["metrics"]["best_stsb_dev"] for r in members if r["config"]["lam"] == x]))
                    members = [r for r in members if r["config"]["lam"] == lam]
                by_method[method_name(scorer, *rd)] = members
        randoms: dict[str, dict] = {}
        for r in at:
            if _scorer(r) == "random":
                randoms.setdefault(_reading(r)[1], {})[r["config"]["seed"]] = val(r)
        for m, members in by_method.items():
            vals = {r["config"]["seed"]: val(r) for r in members}
            combine, normalize = _reading(members[0])
            rand = randoms.get(normalize) or next(iter(randoms.values()), {})
            devs = [r["metrics"]["best_stsb_dev"] for r in members]
            scorer = _scorer(members[0])
            out.append({"sparsity": sp, "method": m, "scorer": scorer, "combine": combine, "normalize": normalize,
                        "lam": members[0]["config"]["lam"] if scorer == "align_uniform" else None,
                        "seeds": sorted(vals), "dev_mean": float(np.mean(devs)), "dev_std": sample_std(devs),
                        "mean": float(np.mean([v for v, _ in vals.values()])),
                        "std": sample_std([v for v, _ in vals.values()]),
                        "vs_control": _compare(vals, ctrl, predictions, metric),
                        "vs_random": _compare(vals, rand, predictions, metric) if scorer != "random" and rand else None})
    return out


def _compare(a: dict, b: dict, predictions: dict | None, metric: str) -> dict:
    """`stats.paired` over seeds of {seed: (value, trial name)}; with one shared seed and both trials' test
    predictions, a paired bootstrap over test pairs gives the verdict (for the STS average)."""
    out = paired({k: v for k, (v, _) in a.items()}, {k: v for k, (v, _) in b.items()})
    if out["n"] == 1 and predictions and metric == "test/avg":
        (seed,) = set(a) & set(b)
        pa, pb = predictions.get(a[seed][1]), predictions.get(b[seed][1])
        if pa is not None and pb is not None:
            out["bootstrap"] = bootstrap_diff(pa, pb)
            out["p"], out["verdict"] = out["bootstrap"]["p"], out["bootstrap"]["verdict"]
    return out


def _pm1(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _vs(c: dict | None) -> str:
    if not c or c["diff"] is None:
        return "—"
    p = "" if c["p"] is None else (", p < 0.001" if c["p"] < 0.001 else f", p = {c['p']:.3f}")
    if c.get("bootstrap"):
        b = c["bootstrap"]
        return (f"{c['diff']:+.2f} [95 % CI {b['lo']:+.2f}, {b['hi']:+.2f}] (one seed; bootstrap over test pairs, "
                f"{b['n_boot']} resamples{p}: {c['verdict']})")
    return f"{c['diff']:+.2f}" + (f" ± {c['std']:.2f}" if c["std"] is not None else "") + f" (n = {c['n']}{p}: {c['verdict']})"


def render_comparisons(comps: list[dict], ctrl: dict | None) -> list[str]:
    """The controls section of report.md."""
    if not comps:
        return []
    base = (f"the s = 0 control (rewound and retrained the same way) scores {_pm1(ctrl['test']['avg'], ctrl['test_std']['avg'])}"
            f" over seeds {ctrl['seeds']}" if ctrl and "avg" in ctrl["test"] else "no s = 0 control finished")
    return ["## Controls at equal budget (STS test avg, Spearman × 100)", "",
            f"Every method retrains the same way from the same pre-trained weights; only how the mask is chosen differs. "
            f"Mean ± sample std over seeds (ddof = 1); Δ is paired over shared seeds (two-sided paired t-test); with "
            f"one seed, a paired bootstrap over the STS test pairs (it measures test-set noise, not training noise); "
            f"{base}.",
            "", render(["sparsity", "method", "λ", "n seeds", "STS-B dev", "test avg", "Δ vs s = 0 control", "Δ vs random"],
                       [[f"{c['sparsity']:.0%}", c["method"], "—" if c["lam"] is None else str(c["lam"]),
                         str(len(c["seeds"])), _pm1(c["dev_mean"], c["dev_std"]), _pm1(c["mean"], c["std"]),
                         _vs(c["vs_control"]), _vs(c["vs_random"])] for c in comps], left=2), ""]


def _pm(mean: dict, std: dict, tasks: list[str]) -> dict:
    return {t: f"{mean[t]:.2f}" + (f" ± {std[t]:.2f}" if std[t] is not None else "")
            for t in tasks if t in mean and t in std}


def _test_keys(rows) -> list[str]:
    keys = [k[5:] for k in rows[0]["metrics"] if k.startswith("test/")]
    return [t for t in STS_TASKS if t in keys] + (["avg"] if "avg" in keys else [])


def _table(rows: list[tuple[str, dict]], tasks: list[str]) -> str:
    return render(["Model", *map(label, tasks)], [[name, *(v.get(t) for t in tasks)] for name, v in rows])


def allocation(head_mask, neuron_mask) -> dict:
    """Where a mask prunes: per layer, the fraction of heads and of FFN neurons removed."""
    hm, nm = np.asarray(head_mask), np.asarray(neuron_mask)
    return {"heads": (hm == 0).mean(1).round(4).tolist(), "neurons": (nm == 0).mean(1).round(4).tolist()}


def render_allocation(alloc: dict, title: str) -> tuple[str, bytes]:
    """A per-layer table (markdown) and a 2 × layers heat map (PNG) of the fraction pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([alloc["heads"], alloc["neurons"]])
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * grid.shape[1], 1.9))
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks([0, 1], ["heads", "neurons"])
    ax.set_xticks(range(grid.shape[1]), [str(i) for i in range(grid.shape[1])])
    ax.set_xlabel("layer")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    md = render([ "", *(str(i) for i in range(grid.shape[1]))],
                [["heads pruned", *(f"{v:.0%}" for v in alloc["heads"])],
                 ["neurons pruned", *(f"{v:.0%}" for v in alloc["neurons"])]])
    return md, png(fig)


def render_figures(rows: list[dict], tasks: list[str], baseline: dict | None = None,
                   backbone: dict | None = None, sampled: bool = False) -> dict[str, bytes]:
    """{file name: PNG}: the STS average, and each task, vs sparsity: one curve per λ of the paper's score and one
    per control scorer (± sample std over seeds); with `sampled` points (sweep.search=optuna) a scatter coloured
    by λ and a quadratic fit in log sparsity instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r["error"] and evaluated(r["metrics"])]
    ours = [r for r in done if _scorer(r) == "align_uniform" and r["config"]["sparsity"] > 0]
    ctrl = [r for r in done if r["config"]["sparsity"] == 0]
    # one curve per (λ, reading) of the paper's score, one per control method; each starts at the s = 0 control
    curves = [(f"λ={lam}" + method_name("align_uniform", *rd)[len("align_uniform"):],
               [r for r in ours if r["config"]["lam"] == lam and _reading(r) == rd])
              for rd in sorted({_reading(r) for r in ours}, key=_reading_order)
              for lam in sorted({r["config"]["lam"] for r in ours if _reading(r) == rd})]
    others = [r for r in done if _scorer(r) != "align_uniform" and r["config"]["sparsity"] > 0]
    curves += [(f"{m} (control)", [r for r in others if _method(r) == m])
               for m in sorted({_method(r) for r in others}, key=lambda m: (CONTROL_SCORERS.index(m.split()[0]), m))]
    out = {}

    def scatter(ax, task):
        pts = [r for r in ours if math.isfinite(r["metrics"].get(f"test/{task}", np.nan))]
        if pts:
            x = np.array([r["config"]["sparsity"] for r in pts])
            y = np.array([r["metrics"][f"test/{task}"] for r in pts])
            sc = ax.scatter(100 * x, y, c=[r["config"]["lam"] for r in pts], cmap="viridis", label="sampled trials")
            ax.figure.colorbar(sc, ax=ax, label="λ")
            if len(pts) >= 4:  # the trend the search followed: quadratic in log sparsity
                coef = np.polyfit(np.log(x), y, 2)
                xs = np.geomspace(x.min(), x.max(), 50)
                ax.plot(100 * xs, np.polyval(coef, np.log(xs)), color="black", lw=1, label="quadratic fit (log s)")
            ax.set_xscale("log")

    def curve(ax, task):
        if sampled:
            scatter(ax, task)
        for name, members in ([] if sampled else curves):
            pts = {}
            for r in members + ctrl:
                pts.setdefault(r["config"]["sparsity"], []).append(r["metrics"].get(f"test/{task}", np.nan))
            xs = sorted(pts)
            # mean over seeds; the bar is ± one sample std over seeds (none with a single seed)
            ax.errorbar([100 * x for x in xs], [np.mean(pts[x]) for x in xs],
                        yerr=[sample_std(pts[x]) or 0.0 for x in xs],
                        marker="o", capsize=3, label=name, ls="-" if name.startswith("λ") else ":")
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
    out["sts_avg_vs_sparsity.png"] = png(fig)
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
        out["sts_tasks_vs_sparsity.png"] = png(fig)
    au = [r for r in done if r["metrics"].get("align") is not None and r["metrics"].get("uniform") is not None]
    if au:  # the paper's Figure 3: alignment vs uniformity (both lower = better), coloured by the STS average
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for scorer, marker in (("align_uniform", "o"), ("random", "x"), ("magnitude", "^"), ("simcse", "s")):
            pts = [r for r in au if _scorer(r) == scorer]
            if pts:
                sc = ax.scatter([r["metrics"]["uniform"] for r in pts], [r["metrics"]["align"] for r in pts],
                                c=[r["metrics"].get("test/avg", np.nan) for r in pts], cmap="viridis", marker=marker,
                                label=scorer if scorer != "align_uniform" else "SparseCSE trials (s = 0: control)")
        for ref, name, color in ((baseline, "SimCSE stage 1", "red"), (backbone, "pre-trained backbone", "black")):
            if ref and ref.get("align") is not None:
                ax.scatter([ref["uniform"]], [ref["align"]], marker="*", s=160, c=color, label=name)
        fig.colorbar(sc, ax=ax, label="STS test avg")
        ax.set_xlabel("uniformity (lower is better)")
        ax.set_ylabel("alignment (lower is better)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out["align_uniform.png"] = png(fig)
    return out


def render_pareto(rows: list[dict], selected: dict, select_lam: float | None = None) -> tuple[str, bytes]:
    """The Pareto section of sweep.objective=pareto: (markdown table of the front, PNG of every candidate point's
    dev vs encoder parameters with the front, the δ band and the chosen point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    par = selected["pareto"]
    groups = _candidates(rows, select_lam)  # the points selection chose from
    pts = [(_params(g), _dev(g), k[0] == 0) for k, g in groups.items() if _params(g) is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p / 1e6 for p, _, c in pts if not c], [d for _, d, c in pts if not c], c="tab:blue", s=18,
               label="grid points (mean over seeds)")
    ax.scatter([p / 1e6 for p, _, c in pts if c], [d for _, d, c in pts if c], c="grey", marker="s", label="s = 0 control")
    front = par["front"]
    ax.plot([f["params"] / 1e6 for f in front], [f["dev"] for f in front], "-o", color="tab:orange", label="Pareto front")
    ax.axhspan(par["best_dev"] - par["delta"], par["best_dev"], color="tab:green", alpha=0.12,
               label=f"within δ = {par['delta']:g} of the best dev")
    ax.scatter([selected["params"] / 1e6], [selected["dev_mean"]], marker="*", s=220, c="red", label="selected", zorder=3)
    ax.set_xlabel("encoder parameters (millions, after physical pruning)")
    ax.set_ylabel("STS-B dev Spearman × 100")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    table = render(["sparsity", "method", "λ", "params", "STS-B dev", "test avg", "seeds", ""],
                   [[f"{f['sparsity']:.2%}", "SimCSE control" if f["sparsity"] == 0 else f["method"],
                     "—" if f["sparsity"] == 0 else str(f["lam"]), f"{f['params']:,}", f["dev"], f["test_avg"],
                     str(f["seeds"]), "**selected**" if f["selected"] else ""]
                    for f in front], left=0)
    return table, png(fig)


def stability(rows: list[dict], selected: dict | None, tasks: list[str]) -> list[dict]:
    """Per task: the paper's grid point (s = 0 included) best on that task's test score (mean over seeds), and how
    far it is from the dev-selected point — whether one sparsity serves every task."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if _finished(r) and _scorer(r) == "align_uniform":
            groups.setdefault(_point_key(r), []).append(r)
    if not groups or not selected:
        return []
    sel_key = ((0.0, 0.0, "", "") if selected["sparsity"] == 0 else
               (selected["sparsity"], selected["lam"], selected.get("combine", "gradient"),
                selected.get("normalize", "none")))
    mean = lambda k, t: float(np.mean([r["metrics"].get(f"test/{t}", np.nan) for r in groups[k]]))  # noqa: E731
    out = []
    for t in tasks:
        best = max(groups, key=lambda k: mean(k, t))
        out.append({"task": t, "best_sparsity": best[0], "best_lam": best[1],
                    "best_reading": method_name("align_uniform", *best[2:])[len("align_uniform "):] if best[0] else "",
                    "best": mean(best, t),
                    "selected": mean(sel_key, t) if sel_key in groups else None,
                    "sparsity_gap": best[0] - selected["sparsity"]})
    return out


def results_table(rows: list[dict], tasks: list[str]) -> list[dict]:
    """One flat record per trial (results.parquet / results.json), sorted by (sparsity, λ, seed)."""
    flat = []
    for r in rows:
        m = r["metrics"]
        flat.append({**{k: r["config"].get(k) for k in ("sparsity", "lam", "seed")},
                     "scorer": _scorer(r), "combine": _reading(r)[0], "normalize": _reading(r)[1],
                     "method": _method(r), "trial": point_name(r["config"]),
                     "status": "error" if r["error"] else ("done" if evaluated(m) else "incomplete"),
                     "error": r["error"] or "", "best_stsb_dev": m.get("best_stsb_dev"),
                     **{f"test/{t}": m.get(f"test/{t}") for t in tasks},
                     "align": m.get("align"), "uniform": m.get("uniform"), "steps": m.get("step"),
                     "encoder_params": m.get("encoder_params"),
                     "node_id": m.get("node_id"), "checkpoint": r.get("checkpoint")})
    flat.sort(key=lambda x: (x["sparsity"], x["scorer"] != "align_uniform", x["scorer"],
                             _reading_order((x["combine"], x["normalize"])), x["lam"], x["seed"]))
    return flat


def parquet_bytes(flat: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(flat), buf)
    return buf.getvalue()


def render_markdown(title: str, cfg: Config, rows: list[dict], flat: list[dict], selected: dict | None,
                    ctrl: dict | None, baseline: dict, transfer: dict | None, figures: list[str],
                    allocation_md: str | None = None, scoring: dict | None = None, pilot_md: str | None = None,
                    backbone: dict | None = None, comps: list[dict] | None = None, pareto_md: str | None = None) -> str:
    """report.md: the paper's Table 1 (baseline, dev-selected SparseCSE, test-selected best per task), the
    over-seeds table, the controls (`comps`, from `comparisons`; computed here without predictions when None),
    alignment/uniformity, every trial, transfer, figures."""
    tasks = [t for t in cfg.eval.tasks if t in STS_TASKS] + ["avg"]
    failed = sum(x["status"] == "error" for x in flat)
    done = [r for r in rows if not r["error"] and evaluated(r["metrics"])]
    trow = [(f"pre-trained {cfg.model.name} (no SimCSE, for reference)", backbone)] if backbone else []
    trow.append(("SimCSE stage 1 (" + cfg.model.name + "; the model scored, for reference)", baseline))
    if ctrl:  # the headline baseline: unpruned, rewound and retrained exactly like every trial
        trow.append((f"SimCSE control s=0 (rewound + retrained like the trials; mean of seeds {ctrl['seeds']})",
                     ctrl["test"]))
    if selected:
        name = ("SimCSE control s=0, dev-selected (pruning did not win)" if selected["control_won"] else
                f"SparseCSE, dev-selected ({_point_label(selected)})")
        trow.append((name, selected["test"]))
    ours_done = [r for r in done if _scorer(r) == "align_uniform"]
    if ours_done:
        best_per = {t: max(r["metrics"].get(f"test/{t}", -1e9) for r in ours_done) for t in tasks}
        trow.append(("best per task over the grid (test-selected, for reference only)", best_per))
    sw = cfg.sweep
    space = (f"grid sparsity {list(sw.sparsities)} × λ {list(sw.lams)} × seeds {list(sw.seeds)}, mask scorers "
             f"{list(sw.scorers)}" if sw.search == "grid" else
             f"Optuna (TPE) search: {sw.num_samples} samples of sparsity in {list(sw.sparsity_range)} "
             f"({sw.sparsity_scale}) and λ " + (f"in {list(sw.lam_range)}" if sw.lam_range else f"from {list(sw.lams)}")
             + f", seed {sw.seeds[0]}; the s = 0 control with seeds {list(sw.seeds)}")
    md = [f"# SparseCSE sweep report — {title}", "",
          f"Backbone `{cfg.model.name}`; {space} ({len(flat)} trials, {failed} failed). "
          f"Importance: score.combine = {_values(cfg.score.combine)}, score.normalize = {_values(cfg.score.normalize)}. "
          "Selection uses STS-B **dev** (mean over seeds); test figures are reported, never used to choose.", "",
          *_scoring_lines(scoring, cfg), *_stopped_lines(flat, cfg), *_selection_lines(selected, cfg),
          "## Test results (Spearman × 100)", "", _table(trow, tasks), ""]
    if selected and len(selected["seeds"]) > 1:
        seeds_rows = []
        if ctrl:
            seeds_rows.append((f"SimCSE (rewound control s=0, seeds {ctrl['seeds']})",
                               _pm(ctrl["test"], ctrl["test_std"], tasks)))
        seeds_rows.append((f"SparseCSE dev-selected ({_point_label(selected)}, seeds {selected['seeds']})",
                           _pm(selected["test"], selected["test_std"], tasks)))
        md += [f"## Over seeds: mean ± sample std (ddof = 1, n = {len(selected['seeds'])}; test Spearman × 100)", "",
               "Both rows retrain from the pre-trained weights with each seed under the same budget; the control keeps "
               "every head and neuron (sparsity 0), so the difference is the effect of the mask.", "",
               _table(seeds_rows, tasks), ""]
    if pareto_md:
        par = selected["pareto"]
        md += ["## Pareto front: STS-B dev vs encoder parameters (`sweep.objective: pareto`)", "",
               f"Points no other point beats on both dev (mean over seeds) and size. Selection takes the smallest model "
               f"within δ = {par['delta']:g} dev points of the best dev ({par['best_dev']:.2f}); test figures are shown, "
               "never used to choose.", "", pareto_md, ""]
    md += render_comparisons(comparisons(rows, cfg.sweep.select_lam) if comps is None else comps, ctrl)
    if pilot_md:
        md += ["## Pilot study: the trained SimCSE pruned, without rewinding or retraining (the paper's Figure 1)", "",
               "STS test (Spearman × 100) of the stage-1 model with each scorer's mask at each sparsity.", "",
               pilot_md, ""]
    stab = stability(rows, selected, tasks)
    if stab:
        md += ["## Stability: the best sparsity per task (test, mean over seeds) vs the dev-selected one", "",
               render(["task", "best s (test)", "λ", "its score", "dev-selected's score", "s gap"],
                      [[label(x["task"]), f"{x['best_sparsity']:.0%}",
                        "—" if x["best_sparsity"] == 0 else f"{x['best_lam']} {x['best_reading']}".strip(),
                        x["best"], x["selected"], f"{100 * x['sparsity_gap']:+.0f} pts"] for x in stab]), ""]
    if allocation_md:
        md += ["## Where the selected mask prunes (fraction of each layer's heads / FFN neurons)", "",
               f"score.combine = {selected['combine']}, score.normalize = {selected['normalize']} "
               "(`none` ranks raw scores across layers; `layer` normalises each layer first).", "", allocation_md, ""]
    md += ["## Alignment / uniformity (STS-B test; lower is better)", "",
           f"SimCSE stage 1: align {baseline['align']:.4f}, uniform {baseline['uniform']:.4f}"
           + (f"; pre-trained backbone: align {backbone['align']:.4f}, uniform {backbone['uniform']:.4f}"
              if backbone and backbone.get("align") is not None else "") + ".", ""]
    g = lambda v: None if v is None else f"{v:.4f}"  # noqa: E731
    md += ["## All trials", "", render(
        ["sparsity", "scorer", "λ", "seed", "status", "STS-B dev", "test avg", "align", "uniform"],
        [[x["sparsity"], x["method"], str(x["lam"]) if x["scorer"] == "align_uniform" else "—", str(x["seed"]), f"{x['status']} {x['error'][:60]}", x["best_stsb_dev"],
          x["test/avg"], g(x["align"]), g(x["uniform"])] for x in flat], left=0)]
    if transfer:
        from .transfer import format_transfer_markdown

        best = {}
        for r in rows:
            if _finished(r) and _scorer(r) == "align_uniform":
                for k, v in r["metrics"].items():
                    if k.startswith("transfer/") and not k.endswith("_f1"):
                        best[k[9:]] = max(best.get(k[9:], -1.0), v)
        if best:
            transfer = {**transfer, "best per task over the grid (test-selected)": best}
        md += ["", f"## Transfer tasks (accuracy; classifier: {cfg.eval.transfer_classifier})", "",
               format_transfer_markdown(transfer)]
    md += ["" + line for name in figures for line in ("", f"![{name[:-4]}](figures/{name})")]
    return "\n".join(md) + "\n"


def _point_label(selected: dict) -> str:
    reading = selected.get("method", "align_uniform")[len("align_uniform "):]
    return f"s={selected['sparsity']:.0%}, λ={selected['lam']}" + (f", {reading[1:-1]}" if reading else "")


def _values(v) -> str:
    return " | ".join(v) + (" (a grid dimension: each reading is its own grid point)" if len(v) > 1 else "")


def _scoring_lines(scoring: dict | None, cfg: Config) -> list[str]:
    """What importance was scored on, and the label leak the paper's setting carries."""
    if not scoring:
        return []
    n = scoring.get("positive_pairs")
    count = f"{n} " if n is not None else ""  # scores written before the count was recorded
    if cfg.score.source == "unlabeled":
        return [f"Importance scored **label-free**: {count}wiki sentences, each paired with its second dropout view "
                "(no STS labels or pairs used).", ""]
    line = (f"Importance scored on STS-B {cfg.score.split} pairs (the paper's setting): {count}positive pairs "
            f"(gold {'>' if cfg.score.positive_rule == 'gt' else '≥'} {cfg.score.positive_threshold:g}).")
    leak = scoring.get("sts_test_overlap")
    if leak:
        line += (f" **{leak} of the unique positive pairs are verbatim STS12–16 test pairs** (STS-B is built from "
                 "STS 2012–2017), so the STS12–16 test figures are not clean of the scoring labels; "
                 "`score.source: unlabeled` scores without them.")
    elif leak == 0:
        line += " None of them is an STS12–16 test pair."
    return [line, ""]


def _stopped_lines(flat: list[dict], cfg: Config) -> list[str]:
    stopped = [x["trial"] for x in flat if x["status"] == "incomplete"]
    if cfg.sweep.scheduler != "asha" or not stopped:
        return []
    return [f"ASHA stopped {len(stopped)} of {len(flat)} trials early (in training steps; they had at least "
            f"{cfg.sweep.asha_grace_steps or 2 * cfg.train.eval_steps} steps): {', '.join(stopped)}. They have no test "
            "figures, are marked `incomplete` below and are excluded from selection.", ""]


def _selection_lines(selected: dict | None, cfg: Config) -> list[str]:
    if not selected:
        return ["No trial finished: nothing was selected.", ""]
    lam = f" (λ fixed at {cfg.sweep.select_lam} for selection)" if cfg.sweep.select_lam is not None else ""
    out = [f"Selection chose among {selected['candidates']} grid points{lam}, the s = 0 control included"
           + (f", by the smallest encoder within δ = {selected['pareto']['delta']:g} of the best STS-B dev "
              f"({selected['pareto']['best_dev']:.2f}; `sweep.objective: pareto`). " if selected.get("pareto") else ". ")]
    if selected["control_won"]:
        what = "the control is exported" if cfg.sweep.when_control_wins == "export_control" else "nothing is exported"
        why = ("no pruned point comes within δ of the best dev" if selected.get("pareto") else
               "the s = 0 control has the best STS-B dev")
        out[0] += (f"**Pruning did not help on dev**: {why} ({selected['dev_mean']:.2f}); {what} "
                   "(`sweep.when_control_wins`).")
    else:
        out[0] += f"Selected: {_point_label(selected)}, STS-B dev {selected['dev_mean']:.2f}" + (
            f", {selected['params']:,} encoder parameters." if selected.get("params") else ".")
    if "STSBenchmark" in selected["test"]:
        gap = selected["dev_mean"] - selected["test"]["STSBenchmark"]
        out[0] += f" Dev/test gap of the selected point (STS-B dev − STS-B test): {gap:+.2f}."
    return out + [""]


def render_html(md_text: str, figures: dict[str, bytes]) -> str:
    """report.html: the markdown as preformatted text with the figures inlined (one self-contained file)."""
    imgs = "".join(f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{name}"><br>'
                   for name, png in figures.items())
    return ("<!doctype html><meta charset=utf-8><title>SparseCSE report</title>"
            f"<pre style='font:14px monospace'>{html.escape(md_text)}</pre>{imgs}")
