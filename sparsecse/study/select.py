"""Decisions over a sweep's trials, as pure functions of TrialResults: which grid point to export (on STS-B dev,
never test), the s = 0 control, the controls at equal budget with their paired tests, per-task stability, where a
mask prunes, and the flat results table. No rendering here: report.py writes them, figures.py draws them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .. import SparseCSEError
from ..core.config import CONTROL_SCORERS
from ..core.results import DEV, PAPER_SCORER, PARAMS, TrialResult, metric_key, method_name, reading_label, reading_order
from .stats import (ALPHA, bootstrap_diff, correct_family, noninferior, noninferior_runs, paired, sample_std,
                    what_it_would_take)

Key = tuple  # Point.key: (scorer, sparsity, λ, combine, normalize), seeds pooled


@dataclass(frozen=True)
class Selection:
    """The grid point a sweep exports, decided on the selection data (never test), with what the report, the
    figures, the export and the trackers show of it. `control_won`: the s = 0 control was chosen — pruning did
    not help. Over seeds: `dev_mean`, `test` / `test_std` (means and sample stds per STS task); `trial`,
    `checkpoint`, `replicate`: the best-dev seed's trial, whose model is exported. `rule_detail`: a tested rule's
    steps; `pareto`: the front, with sweep.objective=pareto."""

    sparsity: float
    lam: float
    combine: str
    normalize: str
    method: str
    control_won: bool
    candidates: int
    objective: str
    params: int | None
    dev_mean: float
    seeds: list
    test: dict
    test_std: dict
    trial: str
    checkpoint: str | None
    replicate: int
    rule: str
    pareto: dict | None = None
    rule_detail: dict | None = None

    @property
    def key(self) -> Key:
        """The chosen point's Key (the control's when it won)."""
        return CONTROL_KEY if self.sparsity == 0 else (PAPER_SCORER, self.sparsity, self.lam, self.combine,
                                                       self.normalize)

    def to_dict(self) -> dict:
        """The record results.json and summary.json keep (optional parts only when present)."""
        d = {k: getattr(self, k) for k in ("sparsity", "lam", "combine", "normalize", "method", "control_won",
                                           "candidates", "objective", "params", "dev_mean", "seeds", "test",
                                           "test_std", "trial", "checkpoint", "replicate")}
        if self.pareto:
            d["pareto"] = self.pareto
        d["rule"] = self.rule
        if self.rule_detail is not None:
            d["rule_detail"] = self.rule_detail
        return d


def _candidates(results: list[TrialResult], select_lam: float | None) -> dict[Key, list[TrialResult]]:
    """The grid points selection may choose, seeds pooled: the paper's score (λ = `select_lam` only, when set) and
    the s = 0 control; the control scorers (random, magnitude, simcse) never."""
    groups: dict[Key, list[TrialResult]] = {}
    for r in results:
        p = r.point
        if not r.finished or not p.is_paper:
            continue
        if not p.is_control and select_lam is not None and p.lam != select_lam:
            continue
        groups.setdefault(p.key, []).append(r)
    return groups


def _order(key: Key) -> tuple:
    """Grid order of a paper key: sparsity, λ, the default reading first."""
    return key[1], key[2], reading_order(key[3:])


def _dev(members: list[TrialResult]) -> float:
    """The mean score selection reads: on the choice pairs where the trials have them (TrialResult.choice)."""
    return float(np.mean([r.choice for r in members]))


def _params(members: list[TrialResult]) -> int | None:
    return members[0].params


CONTROL_KEY = (PAPER_SCORER, 0.0, 0.0, "", "")


def by_unit(members: list[TrialResult], value, replicates: bool) -> dict:
    """{unit: (mean of `value` over the unit's trials, the first trial's name)}. The unit of replication is the
    stage-1 replicate when the sweep ran several (seeds within one are averaged: paired within a replicate, tested
    over replicates), else the retraining seed."""
    groups: dict[int, list[TrialResult]] = {}
    for r in members:
        groups.setdefault(r.point.replicate if replicates else r.point.seed, []).append(r)
    return {u: (float(np.mean([value(r) for r in g])), g[0].point.name) for u, g in groups.items()}


def has_replicates(results: list[TrialResult]) -> bool:
    return any(r.point.replicate for r in results)


def _units(members: list[TrialResult], replicates: bool = False) -> dict:
    """{unit: mean dev} of one grid point's trials (by_unit)."""
    return {u: v for u, (v, _) in by_unit(members, lambda r: r.choice, replicates).items()}


def _best_per_sparsity(groups: dict[Key, list[TrialResult]]) -> list[Key]:
    """One candidate per pruned sparsity, ascending: the λ/reading with the best mean dev there."""
    best: dict[float, Key] = {}
    for k in sorted((k for k in groups if k != CONTROL_KEY), key=_order):
        if k[1] not in best or _dev(groups[k]) > _dev(groups[best[k[1]]]):
            best[k[1]] = k
    return [best[sp] for sp in sorted(best)]


def _dev_bootstrap(point: list[TrialResult], ctrl: list[TrialResult], dev_predictions: dict | None, rule: str,
                   margin: float) -> dict | None:
    """With one unit, the test over the dev pairs themselves: a paired bootstrap of the dev Spearman (the point's
    best model against the control's, from their per-pair dev predictions), one-sided against −margin for
    non-inferiority, two-sided for superiority. None when the predictions are not there."""
    a, b = ((dev_predictions or {}).get(m[0].point.name) for m in (point, ctrl))
    if a is None or b is None:
        return None
    if rule == "noninferior":
        bt = bootstrap_diff(a, b, null=-margin, alternative="greater")
        return {"n": 1, "diff": bt["diff"], "margin": margin, "p": bt["p"], "lo": bt["lo"], "hi": bt["hi"],
                "test": "one-sided bootstrap over dev pairs", "passed": bt["p"] < ALPHA}
    bt = bootstrap_diff(a, b)
    return {"n": 1, "diff": bt["diff"], "p": bt["p"], "lo": bt["lo"], "hi": bt["hi"],
            "test": "bootstrap over dev pairs", "verdict": bt["verdict"]}


def safe_choice(groups: dict[Key, list[TrialResult]], margin: float,
                choice_predictions: dict | None) -> tuple[Key, dict]:
    """The "safe" rule: sparsities from the least pruned up (each one's best point on the choice data), each
    accepted only when, on every source of the choice data (the clean data's STS-B and SICK parts), the one-sided
    bound of its difference to the s = 0 control — pair noise by bootstrap, training noise from the control's
    retrainings — lies above −margin (an intersection-union test: each source at α, the whole at α); the sparsest
    point before the first failure, else the control. Without the choice predictions or with one control run,
    nothing can be shown: the control."""
    ctrl = groups.get(CONTROL_KEY)
    if ctrl is None:  # nothing to be within the margin of
        key = max(groups, key=lambda k: (_dev(groups[k]), -k[1], -k[2]))
        return key, {"rule": "safe", "margin": margin, "steps": [], "why": "no s = 0 control finished: the best dev"}
    preds = choice_predictions or {}
    runs = lambda members: [preds.get(r.point.name) for r in members]  # noqa: E731
    detail = {"rule": "safe", "margin": margin, "alpha": ALPHA, "steps": []}
    if any(x is None for x in runs(ctrl)):
        return CONTROL_KEY, {**detail, "why": "the trials kept no predictions on the choice pairs: the control"}
    if len(ctrl) < 2:
        return CONTROL_KEY, {**detail, "why": "one control run cannot tell training noise (sweep.control_seeds: 0): "
                                              "nothing can be shown within the margin, so the control"}
    key, sources = CONTROL_KEY, list(runs(ctrl)[0])
    for k in _best_per_sparsity(groups):
        mine = runs(groups[k])
        if any(x is None for x in mine):
            break
        per = {src: noninferior_runs([m[src] for m in mine], [c[src] for c in runs(ctrl)], margin) for src in sources}
        for t in per.values():
            t.update({"verdict": "passed"} if t["passed"] else what_it_would_take(t, margin))
        passed = all(t["passed"] for t in per.values())
        detail["steps"].append({"sparsity": k[1], "lam": k[2], "dev": _dev(groups[k]), "sources": per,
                                "passed": passed})
        if not passed:
            break
        key = k
    detail["why"] = (f"the sparsest point before the first not shown within {margin:g} points of the control on "
                     f"every source ({', '.join(sources)})" if key != CONTROL_KEY else
                     f"no pruned point was shown within {margin:g} points of the control on every source "
                     f"({', '.join(sources)})") + why_stopped(detail["steps"])
    return key, detail


def _ways(t: dict) -> list[str]:
    """What would let a point this close pass (stats.what_it_would_take), in the config's words."""
    ways = [f"{t['seeds_needed']} seeds (sweep.seeds)" if t.get("seeds_needed") else "",
            f"about {t['pairs_needed']:,} choice pairs" if t.get("pairs_needed") else "",
            f"{t['seeds_and_pairs'][0]} seeds and about {t['seeds_and_pairs'][1]:,} choice pairs"
            if t.get("seeds_and_pairs") else "",
            f"sweep.margin {t['margin_needed']:.2f}" if t.get("margin_needed") is not None else ""]
    return [w for w in ways if w]


def why_stopped(steps: list[dict]) -> str:
    """Why the safe rule's sequence stopped, per source that failed: the point is worse than the margin allows, or
    it may be within it but these runs and pairs cannot show it — and what would (80 % power): more seeds, more
    choice pairs, both, or a wider margin."""
    if not steps or steps[-1]["passed"]:
        return ""
    st = steps[-1]
    parts = []
    for src, t in st["sources"].items():
        if t["verdict"] == "worse":
            parts.append(f"on {src}: {t['diff']:+.2f} against the control, beyond the margin (pruning costs more)")
        elif t["verdict"] == "not shown":
            bound = "" if t.get("lower") is None else f" (95 % bound {t['lower']:+.2f} on {t['pairs']:,} pairs)"
            parts.append(f"on {src}: {t['diff']:+.2f} against the control, within the margin but not shown{bound}"
                         + (f"; a point truly this close would pass 4 times in 5 with {' or '.join(ways)}"
                            if (ways := _ways(t)) else ""))
    return f"; at {st['sparsity']:.0%}: " + "; ".join(parts)


def rule_choice(groups: dict[Key, list[TrialResult]], rule: str, margin: float,
                dev_predictions: dict | None = None) -> tuple[Key, dict]:
    """The grid point a noise-aware rule chooses, and why ({"rule", "margin", "steps", "why"}).

    noninferior: a fixed-sequence test from the least to the most pruned sparsity (each sparsity's best-dev point):
    each one-sided test that the point's dev is not worse than the s = 0 control's by `margin` or more, over the
    units both ran; the sparsest point before the first failure is chosen, the control when the first fails. A fixed
    sequence holds the family-wise error at α without a correction.
    superior: each sparsity's best-dev point against the control (`stats.paired`), Holm-corrected as one family;
    the best dev among those credited "better", else the control."""
    ctrl = groups.get(CONTROL_KEY)
    reps = any(has_replicates(g) for g in groups.values())
    if ctrl is None:  # nothing to be non-inferior or superior to
        key = max(groups, key=lambda k: (_dev(groups[k]), -k[1], -k[2]))
        return key, {"rule": rule, "margin": margin, "steps": [], "why": "no s = 0 control finished: the best dev"}
    steps, key = [], CONTROL_KEY
    if rule == "noninferior":
        for k in _best_per_sparsity(groups):
            t = noninferior(_units(groups[k], reps), _units(ctrl, reps), margin)
            if t["n"] == 1:  # one unit: test on the dev pairs when their predictions were kept
                t = _dev_bootstrap(groups[k], ctrl, dev_predictions, rule, margin) or t
            steps.append({"sparsity": k[1], "lam": k[2], "dev": _dev(groups[k]), **t})
            if not t["passed"]:
                break
            key = k
        why = (f"the sparsest point before the first that was not shown within {margin:g} dev points of the control"
               if key != CONTROL_KEY else f"no pruned point was shown within {margin:g} dev points of the control")
    else:
        cands = _best_per_sparsity(groups)
        tests = [paired(_units(groups[k], reps), _units(ctrl, reps)) for k in cands]
        tests = [(_dev_bootstrap(groups[k], ctrl, dev_predictions, rule, margin) or t) if t["n"] == 1 else t
                 for k, t in zip(cands, tests)]
        correct_family(tests)
        for k, t in zip(cands, tests):
            steps.append({"sparsity": k[1], "lam": k[2], "dev": _dev(groups[k]),
                          "passed": t["verdict"] == "better", **t})
        winners = [k for k, t in zip(cands, tests) if t["verdict"] == "better"]
        key = max(winners, key=lambda k: _dev(groups[k])) if winners else CONTROL_KEY
        why = ("the best dev among the points that beat the control after Holm's correction" if winners else
               "no pruned point beat the control on dev after Holm's correction")
    return key, {"rule": rule, "margin": margin, "alpha": ALPHA, "steps": steps, "why": why}


def select(results: list[TrialResult], select_lam: float | None = None, objective: str = "dev",
           delta: float = 0.5, rule: str = "best_dev", margin: float = 0.5,
           dev_predictions: dict | None = None) -> Selection | None:
    """The grid point to export, chosen on the selection data's Spearman (the choice pairs where the trials have
    them, TrialResult.choice) averaged over seeds — never test — among the paper's points (λ = `select_lam` only,
    when set) **and the s = 0 control**: when the control is chosen, pruning did not help and the selection says so
    (`control_won`). The control scorers are never selected. Each reading of the scores (score.combine ×
    score.normalize) is a grid point of its own.

    objective "dev", rule "best_dev": the highest dev; ties go to the lower sparsity (the control first), then the
    lower λ. rule "safe": safe_choice, over `dev_predictions` = {trial name: {source: (pred, gold)}} on the choice
    pairs. rule "noninferior" / "superior": a tested choice against the control (rule_choice; with one unit,
    over the dev pairs of `dev_predictions`, {trial name: {"dev": (pred, gold)}}).
    objective "pareto": the smallest encoder (fewest parameters) whose dev is within `delta` of the best dev; ties
    go to the higher dev. The result then carries the Pareto front of (dev ↑, parameters ↓) as `pareto`."""
    groups = _candidates(results, select_lam)
    if not groups:
        return None
    order = sorted(groups, key=_order)
    best = max(order, key=lambda k: (_dev(groups[k]), -k[1], -k[2]))
    pareto, why = None, None
    if objective == "pareto":
        if any(_params(g) is None for g in groups.values()):
            raise SparseCSEError("sweep.objective=pareto: trials of this run did not report encoder_params (they ran "
                                 "before it existed); rerun them, or select with sweep.objective=dev")
        top = _dev(groups[best])
        key = min((k for k in order if _dev(groups[k]) >= top - delta),
                  key=lambda k: (_params(groups[k]), -_dev(groups[k])))
        front = pareto_front([{"key": k, "dev": _dev(groups[k]), "params": _params(groups[k])} for k in order])
        pareto = {"delta": delta, "best_dev": top,
                  "front": [_front_row(groups[p["key"]], p, p["key"] == key) for p in front]}
    elif rule == "safe":
        key, why = safe_choice(groups, margin, dev_predictions)
    elif rule != "best_dev":
        key, why = rule_choice(groups, rule, margin, dev_predictions)
    else:
        key = best
    members = groups[key]
    first = members[0].point
    return Selection(sparsity=key[1], lam=first.lam, combine=first.combine, normalize=first.normalize,
                     method=method_name(PAPER_SCORER, first.combine, first.normalize), control_won=first.is_control,
                     candidates=len(groups), objective=objective, params=_params(members), **_seed_stats(members),
                     rule="pareto" if pareto else rule, pareto=pareto,
                     rule_detail=why)


def candidate_points(results: list[TrialResult], select_lam: float | None = None) -> list[dict]:
    """Every point selection chose from: {"sparsity", "dev" (mean over seeds), "params", "control"} — what the
    Pareto figure plots."""
    groups = _candidates(results, select_lam)
    return [{"sparsity": k[1], "dev": _dev(g), "params": _params(g), "control": k[1] == 0}
            for k, g in groups.items()]


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point dominates (dev at least as high and parameters at most as many, one of them
    strictly), by parameters ascending."""
    front = [p for p in points if not any(
        q["dev"] >= p["dev"] and q["params"] <= p["params"] and (q["dev"] > p["dev"] or q["params"] < p["params"])
        for q in points)]
    return sorted(front, key=lambda p: (p["params"], -p["dev"]))


def _front_row(members: list[TrialResult], p: dict, chosen: bool) -> dict:
    first = members[0].point
    return {"sparsity": first.sparsity if not first.is_control else 0.0, "lam": first.lam, "method": first.method,
            "dev": p["dev"], "params": p["params"], "test_avg": _seed_stats(members)["test"].get("avg"),
            "seeds": len(members), "selected": chosen}


def _seed_stats(members: list[TrialResult]) -> dict:
    """Mean and sample std over seeds of the dev score and every test task of one grid point's trials; the
    best-dev seed's checkpoint is the one to export."""
    best_seed = max(members, key=lambda r: r.dev)
    tasks = members[0].test_tasks()
    return {"dev_mean": _dev(members), "seeds": [r.point.seed for r in members],
            "test": {t: float(np.mean([r.test(t) for r in members])) for t in tasks},
            "test_std": {t: sample_std([r.test(t) for r in members]) for t in tasks},
            "trial": best_seed.point.name, "checkpoint": best_seed.checkpoint,
            "replicate": best_seed.point.replicate}


def control(results: list[TrialResult]) -> dict | None:
    """The rewound SimCSE control (sparsity 0, retrained per seed) over its finished seeds: SimCSE's seed spread."""
    members = [r for r in results if r.finished and r.point.is_control]
    if not members:
        return None
    return _seed_stats(_one_control_per_run(members))


def _one_control_per_run(members: list[TrialResult]) -> list[TrialResult]:
    """One s = 0 trial per (replicate, seed): with several λ values in the grid an older sweep ran the s = 0 point
    once per λ."""
    by_run: dict[tuple, TrialResult] = {}
    for r in sorted(members, key=lambda r: r.point.lam):
        by_run.setdefault((r.point.replicate, r.point.seed), r)
    return [by_run[k] for k in sorted(by_run)]


def _methods_at(at: list[TrialResult], select_lam: float | None) -> dict[str, list[TrialResult]]:
    """{method: its trials at one sparsity}: the paper's score under each reading at one λ (`select_lam`, else the
    best on dev there), and each control scorer under each reading."""
    by_method: dict[str, list[TrialResult]] = {}
    for scorer in (PAPER_SCORER, *CONTROL_SCORERS):
        mine = [r for r in at if r.point.scorer == scorer]
        for rd in sorted({r.point.reading for r in mine}, key=reading_order):
            members = [r for r in mine if r.point.reading == rd]
            if scorer == PAPER_SCORER:
                lams = sorted({r.point.lam for r in members})
                lam = select_lam if select_lam in lams else max(lams, key=lambda x: np.mean(
                    [r.dev for r in members if r.point.lam == x]))
                members = [r for r in members if r.point.lam == lam]
            by_method[method_name(scorer, *rd)] = members
    return by_method


@dataclass(frozen=True)
class Comparison:
    """One row of the controls table: a mask-choosing method at one sparsity, over its seeds (or stage-1
    replicates: `unit`), tested against the s = 0 control and against random at the same budget (`stats.paired`
    results, Holm-adjusted over the table; `vs_random` None for random itself or without a random control)."""

    sparsity: float
    method: str
    scorer: str
    combine: str
    normalize: str
    lam: float | None
    seeds: list
    unit: str
    dev_mean: float
    dev_std: float | None
    mean: float
    std: float | None
    vs_control: dict
    vs_random: dict | None

    def to_dict(self) -> dict:
        """The record summary.json and results.json keep."""
        return asdict(self)


def comparisons(results: list[TrialResult], select_lam: float | None = None, metric: str = metric_key("test", "avg"),
                predictions: dict | None = None) -> list[Comparison]:
    """At every sparsity > 0, each mask-choosing method at the same retraining budget — the paper's score under
    each reading (at the λ best on dev at that sparsity, or `select_lam`), random, magnitude, simcse — with
    `metric` over seeds, paired against the s = 0 control and against random (same normalize reading when run).
    Every test of the table is one family: p is Holm-adjusted over it (p_raw the test's own) and the verdicts use
    the adjusted p.
    Where only one seed is shared, `predictions` ({trial name: per-pair test predictions}) give a paired bootstrap
    over test pairs instead of no claim."""
    fin = [r for r in results if r.finished]
    reps = has_replicates(fin)
    val = lambda members: by_unit(members, lambda r: r.metrics[metric], reps)  # noqa: E731
    ctrl = val(_one_control_per_run([r for r in fin if r.point.is_control]))
    out = []
    for sp in sorted({r.point.sparsity for r in fin if not r.point.is_control}):
        at = [r for r in fin if r.point.sparsity == sp]
        randoms = {nz: val([r for r in at if r.point.scorer == "random" and r.point.normalize == nz])
                   for nz in sorted({r.point.normalize for r in at if r.point.scorer == "random"})}
        for m, members in _methods_at(at, select_lam).items():
            vals = val(members)
            p = members[0].point
            rand = randoms.get(p.normalize) or next(iter(randoms.values()), {})
            devs = [r.dev for r in members]
            out.append(Comparison(
                sp, m, p.scorer, p.combine, p.normalize, p.lam if p.is_paper else None, sorted(vals),
                "replicate" if reps else "seed", float(np.mean(devs)), sample_std(devs),
                float(np.mean([v for v, _ in vals.values()])), sample_std([v for v, _ in vals.values()]),
                _compare(vals, ctrl, predictions, metric),
                _compare(vals, rand, predictions, metric) if p.scorer != "random" and rand else None))
    correct_family([t for c in out for t in (c.vs_control, c.vs_random)])  # the table is one family: Holm
    return out


def _compare(a: dict, b: dict, predictions: dict | None, metric: str) -> dict:
    """`stats.paired` over seeds of {seed: (value, trial name)}; with one shared seed and both trials' test
    predictions, a paired bootstrap over test pairs gives the verdict (for the STS average)."""
    out = paired({k: v for k, (v, _) in a.items()}, {k: v for k, (v, _) in b.items()})
    if out["n"] == 1 and predictions and metric == metric_key("test", "avg"):
        (seed,) = set(a) & set(b)
        pa, pb = predictions.get(a[seed][1]), predictions.get(b[seed][1])
        if pa is not None and pb is not None:
            out["bootstrap"] = bootstrap_diff(pa, pb)
            out["p"], out["verdict"] = out["bootstrap"]["p"], out["bootstrap"]["verdict"]
    return out


def selected_comparison(comps: list[Comparison], selected: Selection | None) -> Comparison | None:
    """The controls-table row of the selected point (its Δ vs the s = 0 control), or None (the control won)."""
    if not selected or selected.control_won:
        return None
    return next((c for c in comps if c.sparsity == selected.sparsity and c.scorer == PAPER_SCORER
                 and c.combine == selected.combine and c.normalize == selected.normalize
                 and c.lam == selected.lam), None)


@dataclass(frozen=True)
class Stability:
    """One task's row of the stability table: the paper's grid point best on its test score (mean over seeds) and
    how far that is from the dev-selected point."""

    task: str
    best_sparsity: float
    best_lam: float
    best_reading: str  # "" at s = 0 (no mask, no reading)
    best: float
    selected: float | None
    sparsity_gap: float


def stability(results: list[TrialResult], selected: Selection | None, tasks: list[str]) -> list[Stability]:
    """Per task: the paper's grid point (s = 0 included) best on that task's test score (mean over seeds), and how
    far it is from the dev-selected point — whether one sparsity serves every task."""
    groups: dict[Key, list[TrialResult]] = {}
    for r in results:
        if r.finished and r.point.is_paper:
            groups.setdefault(r.point.key, []).append(r)
    if not groups or not selected:
        return []
    sel_key = selected.key
    mean = lambda k, t: float(np.mean([r.test(t, np.nan) for r in groups[k]]))  # noqa: E731
    out = []
    for t in tasks:
        best = max(groups, key=lambda k: mean(k, t))
        out.append(Stability(t, best[1], best[2], reading_label(PAPER_SCORER, *best[3:]) if best[1] else "",
                             mean(best, t), mean(sel_key, t) if sel_key in groups else None,
                             best[1] - selected.sparsity))
    return out


@dataclass(frozen=True)
class Findings:
    """What the report states beside the selection, decided here so the renderers only render: the controls at
    equal budget with their tests (`comparisons`), per-task stability, the best transfer accuracy per task over the
    grid, the test tasks clean of the data that chose and scored with their averages for the selected point and
    the control, and the spread of the stage-1 replicates' best dev (mean, sample std)."""

    comparisons: list[Comparison] = field(default_factory=list)
    stability: list[Stability] = field(default_factory=list)
    best_transfer: dict = field(default_factory=dict)
    clean_tasks: list = field(default_factory=list)
    clean_selected: float | None = None
    clean_control: float | None = None
    replicate_spread: tuple | None = None
    rules: dict | None = None  # {rule: sparsity it picks on these trials} (outcome.rule_choices)
    best_test: dict = field(default_factory=dict)  # {STS task: the best test score over the grid}, for reference


def findings(results: list[TrialResult], selected: Selection | None, tasks: list[str],
             select_lam: float | None = None, predictions: dict | None = None, overlap: list[dict] | None = None,
             replicates: list[dict] | None = None, comps: list[Comparison] | None = None,
             rules: dict | None = None) -> Findings:
    """The report's Findings from the trials, the selection, the scores file's overlap counts and the stage-1
    replicates' best dev (`predictions`: per-pair test predictions for single-seed bootstraps; `comps`: the
    comparisons already computed, e.g. for summary.json)."""
    clean = clean_tasks(overlap or [])
    ctrl = control(results)
    devs = [r[DEV] for r in replicates or []]
    comps = comps if comps is not None else comparisons(results, select_lam, predictions=predictions)
    return Findings(comps, stability(results, selected, tasks),
                    best_transfer(results), clean, clean_average(selected.test if selected else None, clean),
                    clean_average((ctrl or {}).get("test"), clean),
                    (float(np.mean(devs)), sample_std(devs)) if len(devs) > 1 else None, rules,
                    best_test(results, tasks))


def clean_tasks(overlap: list[dict]) -> list[str]:
    """The test tasks none of whose pairs occur in the selection data or the scoring data."""
    return [o["task"] for o in overlap if o["in_selection"] == 0 and not o["in_scoring"]]


def clean_average(test: dict | None, tasks: list[str]) -> float | None:
    """The mean test score over `tasks` (those clean of the selection and scoring data), or None when a task is
    missing."""
    if not test or not tasks or not all(t in test for t in tasks):
        return None
    return sum(test[t] for t in tasks) / len(tasks)


def best_test(results: list[TrialResult], tasks: list[str]) -> dict[str, float]:
    """{STS task: the best test score over the paper's evaluated trials} (test-selected, for reference only)."""
    done = [r for r in results if not r.error and r.evaluated and r.point.is_paper]
    return {t: max(r.test(t, -1e9) for r in done) for t in tasks} if done else {}


def best_transfer(results: list[TrialResult]) -> dict[str, float]:
    """{transfer task: the best accuracy over the paper's finished trials} (test-selected, for reference)."""
    best: dict[str, float] = {}
    for r in results:
        if r.finished and r.point.is_paper:
            for k, v in r.transfer().items():
                best[k] = max(best.get(k, -1.0), v)
    return best


def allocation(head_mask, neuron_mask) -> dict:
    """Where a mask prunes: per layer, the fraction of heads and of FFN neurons removed."""
    hm, nm = np.asarray(head_mask), np.asarray(neuron_mask)
    return {"heads": (hm == 0).mean(1).round(4).tolist(), "neurons": (nm == 0).mean(1).round(4).tolist()}


def results_table(results: list[TrialResult], tasks: list[str]) -> list[dict]:
    """One flat record per trial (results.parquet / results.json), sorted by (sparsity, scorer, reading, λ, seed)."""
    flat = []
    for r in results:
        p, m = r.point, r.metrics
        flat.append({"sparsity": p.sparsity, "lam": p.lam, "seed": p.seed, "replicate": p.replicate,
                     "scorer": p.scorer, "combine": p.combine,
                     "normalize": p.normalize, "method": p.method, "trial": p.name, "status": r.status,
                     "error": r.error or "", DEV: m.get(DEV),
                     **{metric_key("choice", k): v for k, v in r.choice_scores().items()},
                     **{metric_key("test", t): r.test(t) for t in tasks},
                     "align": m.get("align"), "uniform": m.get("uniform"), "steps": m.get("step"),
                     PARAMS: m.get(PARAMS), "node_id": m.get("node_id"),
                     "trial_s": m.get("trial_s"), "gpu_peak_gib": m.get("gpu_peak_gib"),
                     "checkpoints": m.get("checkpoints"),
                     "checkpoint_bytes": m.get("checkpoint_bytes"), "checkpoint_s": m.get("checkpoint_s"),
                     "checkpoint": r.checkpoint})
    flat.sort(key=lambda x: (x["sparsity"], x["scorer"] != PAPER_SCORER, x["scorer"],
                             reading_order((x["combine"], x["normalize"])), x["lam"], x["seed"]))
    return flat


# --------------------------------------------------------------------------- what the figures draw

@dataclass(frozen=True)
class Curve:
    """One method's test score vs sparsity: the mean and sample std over seeds (0 where one) at each sparsity, the
    s = 0 control first. `paper`: the paper's score (drawn solid), else a control method (dotted)."""

    label: str
    paper: bool
    sparsity: list
    mean: list
    std: list


@dataclass(frozen=True)
class Sampled:
    """Sampled points (sweep.search=optuna) of one task: test score vs sparsity with each point's λ, and the trend
    the search followed (a quadratic in log sparsity, from four points on) as (sparsities, fitted scores)."""

    sparsity: list
    score: list
    lam: list
    trend: tuple | None


def _method_groups(done: list[TrialResult]) -> list[tuple[str, bool, list[TrialResult]]]:
    """(legend, paper?, trials) per curve: one per (λ, reading) of the paper's score, then one per control method."""
    ours = [r for r in done if r.point.is_paper and not r.point.is_control]
    out = []
    for rd in sorted({r.point.reading for r in ours}, key=reading_order):
        for lam in sorted({r.point.lam for r in ours if r.point.reading == rd}):
            lbl = reading_label(PAPER_SCORER, *rd)
            out.append((f"λ={lam}" + (f" {lbl}" if lbl else ""), True,
                        [r for r in ours if r.point.lam == lam and r.point.reading == rd]))
    others = [r for r in done if not r.point.is_paper and not r.point.is_control]
    methods = sorted({(r.point.scorer, r.point.method) for r in others},
                     key=lambda sm: (CONTROL_SCORERS.index(sm[0]), sm[1]))
    return out + [(f"{m} (control)", False, [r for r in others if r.point.method == m]) for _, m in methods]


def sts_curves(done: list[TrialResult], task: str) -> tuple[list[Curve], float | None]:
    """Every method's curve of `task`'s test score over sparsity (each starting at the s = 0 control), and the
    control's mean (None without one)."""
    ctrl = [r for r in done if r.point.is_control]
    curves = []
    for name, paper, members in _method_groups(done):
        pts: dict[float, list[float]] = {}
        for r in members + ctrl:
            pts.setdefault(r.point.sparsity, []).append(r.test(task, np.nan))
        xs = sorted(pts)
        curves.append(Curve(name, paper, xs, [float(np.mean(pts[x])) for x in xs],
                            [sample_std(pts[x]) or 0.0 for x in xs]))
    return curves, (float(np.mean([r.test(task, np.nan) for r in ctrl])) if ctrl else None)


def sampled_points(done: list[TrialResult], task: str) -> Sampled | None:
    pts = [r for r in done if r.point.is_paper and not r.point.is_control and np.isfinite(r.test(task, np.nan))]
    if not pts:
        return None
    x = np.array([r.point.sparsity for r in pts])
    y = np.array([r.test(task) for r in pts])
    trend = None
    if len(pts) >= 4:
        coef = np.polyfit(np.log(x), y, 2)
        xs = np.geomspace(x.min(), x.max(), 50)
        trend = (xs.tolist(), np.polyval(coef, np.log(xs)).tolist())
    return Sampled(x.tolist(), y.tolist(), [r.point.lam for r in pts], trend)
