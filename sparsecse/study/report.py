"""The sweep report: report.md and report.html rendered from one `ReportInputs` (what select.py decided and what
figures.py drew). Pure: data in, text out; the driver (sweep.py) writes both to storage.

report.md is the paper's Table 1 and the study's sections as markdown; report.html renders the same sections
(markdown-it-py: real headings and tables), each figure beside its section, and opens with the answer."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from ..core.config import SELECT_ON, Config, select_on_label
from ..core.results import DEV, PAPER_SCORER, TrialResult, metric_key, reading_parts, sts_tasks, upgrade_record
from ..core.tables import label, render
from ..method.transfer import format_transfer_markdown
from .pilot import row_method
from .select import Comparison, Findings, Selection, selected_comparison
from .stats import ALPHA, EXACT_BELOW


@dataclass
class ReportInputs:
    """Everything a report shows. `figures`: {file name: PNG bytes}, in the order report.md lists them."""

    title: str
    cfg: Config
    results: list[TrialResult]
    flat: list[dict]  # select.results_table
    selected: Selection | None
    control: dict | None
    baseline: dict  # STS of the stage-1 SimCSE (with align/uniform)
    transfer: dict | None = None  # {model: {task: accuracy}}
    figures: dict[str, bytes] = field(default_factory=dict)
    allocation: dict | None = None  # select.allocation of the selected mask
    scoring: dict | None = None  # the scores file's meta
    pilot: list[dict] | None = None  # pilot.pilot rows
    backbone: dict | None = None  # STS of the pre-trained backbone
    replicates: list[dict] | None = None  # outcome.replicate_devs: each stage-1 run's seed and best dev
    findings: Findings = field(default_factory=Findings)  # select.findings: comparisons, stability, clean tasks…
    backbone_own: dict | None = None  # {"pooler", "sts"}: the pre-trained model with its own pooling (MiniLM: mean)
    export_speed: list[dict] | None = None  # export.speed_rows: each path's sentences/s and × the dense model

    @property
    def dev(self) -> str:
        """How the report names the selection data (sweep.select_on)."""
        return select_on_label(self.cfg.sweep.select_on)

    @property
    def tasks(self) -> list[str]:
        return [*sts_tasks(self.cfg.eval.tasks), "avg"]



# --------------------------------------------------------------------------- cells and small tables

def _pm1(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _pm(mean: dict, std: dict, tasks: list[str]) -> dict:
    return {t: f"{mean[t]:.2f}" + (f" ± {std[t]:.2f}" if std[t] is not None else "")
            for t in tasks if t in mean and t in std}


def _table(rows: list[tuple[str, dict]], tasks: list[str]) -> str:
    return render(["Model", *map(label, tasks)], [[name, *(v.get(t) for t in tasks)] for name, v in rows])


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _vs(c: dict | None) -> str:
    if not c or c["diff"] is None:
        return "—"
    test = {"exact sign-flip": "exact ", "paired t": "t "}.get(c.get("test"), "")
    p = "" if c["p"] is None else f", {test}{_p(c.get('p_raw', c['p']))}" + (
        f", Holm {_p(c['p'])}" if "family" in c else "")
    if c.get("bootstrap"):
        b = c["bootstrap"]
        return (f"{c['diff']:+.2f} [95 % CI {b['lo']:+.2f}, {b['hi']:+.2f}] (one seed; bootstrap over test pairs, "
                f"{b['n_boot']} resamples{p}: {c['verdict']})")
    return f"{c['diff']:+.2f}" + (f" ± {c['std']:.2f}" if c["std"] is not None else "") + f" (n = {c['n']}{p}: {c['verdict']})"


def _point_label(selected: Selection) -> str:
    reading = reading_parts(PAPER_SCORER, selected.combine, selected.normalize)
    return f"s={selected.sparsity:.0%}, λ={selected.lam}" + "".join(f", {r}" for r in reading)


def _values(v) -> str:
    return " | ".join(v) + (" (a grid dimension: each reading is its own grid point)" if len(v) > 1 else "")


def allocation_table(alloc: dict) -> str:
    """Per layer, the fraction of heads and of FFN neurons the selected mask prunes."""
    n = len(alloc["heads"])
    return render(["", *(str(i) for i in range(n))],
                  [["heads pruned", *(f"{v:.0%}" for v in alloc["heads"])],
                   ["neurons pruned", *(f"{v:.0%}" for v in alloc["neurons"])]])


def pareto_table(front: list[dict], dev: str = "STS-B dev") -> str:
    return render(["sparsity", "method", "λ", "params", dev, "test avg", "seeds", ""],
                  [[f"{f['sparsity']:.2%}", "SimCSE control" if f["sparsity"] == 0 else f["method"],
                    "—" if f["sparsity"] == 0 else str(f["lam"]), f"{f['params']:,}", f["dev"], f["test_avg"],
                    str(f["seeds"]), "**selected**" if f["selected"] else ""] for f in front], left=0)


def pilot_table(rows: list[dict], tasks: list[str]) -> str:

    cols = [t for t in (*tasks, "avg") if t in rows[0]]
    return render(["mask chosen by", "sparsity", *map(label, cols)],
                  [[row_method(r), f"{r['sparsity']:.0%}", *(r[t] for t in cols)] for r in rows], left=2)


def _family(comps: list[Comparison]) -> int:
    return next((t["family"] for c in comps for t in (c.vs_control, c.vs_random) if t and "family" in t), 0)


def render_comparisons(comps: list[Comparison], ctrl: dict | None, dev: str = "STS-B dev") -> list[str]:
    """The controls section of report.md."""
    if not comps:
        return []
    base = (f"the s = 0 control (rewound and retrained the same way) scores {_pm1(ctrl['test']['avg'], ctrl['test_std']['avg'])}"
            f" over seeds {ctrl['seeds']}" if ctrl and "avg" in ctrl["test"] else "no s = 0 control finished")
    return ["## Controls at equal budget (STS test avg, Spearman × 100)", "",
            f"Every method retrains the same way from the same pre-trained weights; only how the mask is chosen differs. "
            f"Mean ± sample std over seeds (ddof = 1); Δ is paired over shared seeds (two-sided; below "
            f"{EXACT_BELOW} seeds the exact sign-flip test, whose smallest attainable p is 2/2^n, else the paired "
            f"t-test); with one seed, a paired bootstrap over the STS test pairs (it measures test-set noise, not "
            f"training noise). The table is one family of {_family(comps)} tests: verdicts use Holm-adjusted p at "
            f"α = {ALPHA} (raw p beside it); {base}.",
            "", render(["sparsity", "method", "λ", "n seeds", dev, "test avg", "Δ vs s = 0 control", "Δ vs random"],
                       [[f"{c.sparsity:.0%}", c.method, "—" if c.lam is None else str(c.lam),
                         str(len(c.seeds)), _pm1(c.dev_mean, c.dev_std), _pm1(c.mean, c.std),
                         _vs(c.vs_control), _vs(c.vs_random)] for c in comps], left=2), ""]


# --------------------------------------------------------------------------- the sections, in order

def _intro(inp: ReportInputs) -> list[str]:
    sw, cfg = inp.cfg.sweep, inp.cfg
    failed = sum(x["status"] == "error" for x in inp.flat)
    space = (f"grid sparsity {list(sw.sparsities)} × λ {list(sw.lams)} × seeds {list(sw.seeds)}, mask scorers "
             f"{list(sw.scorers)}" if sw.search == "grid" else
             f"Optuna (TPE) search: {sw.num_samples} samples of sparsity in {list(sw.sparsity_range)} "
             f"({sw.sparsity_scale}) and λ " + (f"in {list(sw.lam_range)}" if sw.lam_range else f"from {list(sw.lams)}")
             + f", seed {sw.seeds[0]}; the s = 0 control with seeds {list(sw.seeds)}")
    return [f"# SparseCSE sweep report — {inp.title}", "",
            f"Backbone `{cfg.model.name}`; {space} ({len(inp.flat)} trials, {failed} failed). " + _importance(cfg)
            + ("Selection uses STS-B **dev**" if inp.dev == "STS-B dev" else f"Selection uses **{inp.dev}**")
            + " (mean over seeds); test figures are reported, never used to choose.", "",
            *_scoring_lines(inp.scoring, cfg), *_selection_data_lines(inp),
            *_replicate_lines(inp.replicates, inp.findings.replicate_spread, inp.dev),
            *_stopped_lines(inp.flat, cfg),
            *_selection_lines(inp.selected, cfg), *_other_rules(inp.findings.rules, cfg)]


def _test_results(inp: ReportInputs) -> list[str]:
    """The paper's Table 1: backbone, stage-1 SimCSE, the control, the dev-selected point, best per task."""
    tasks, ctrl, selected = inp.tasks, inp.control, inp.selected
    name = inp.cfg.model.name
    trow = [(f"pre-trained {name} (no SimCSE, for reference)", inp.backbone)] if inp.backbone else []
    if inp.backbone_own:  # what its users get from it: the model to beat for a deployment
        own = {"avg": "mean", "cls_before_pooler": "CLS"}.get(inp.backbone_own["pooler"], inp.backbone_own["pooler"])
        trow.insert(0, (f"pre-trained {name} with its own {own} pooling (as its users run it)",
                        inp.backbone_own["sts"]))
    trow.append(("SimCSE stage 1 (" + name + "; the model scored, for reference)", inp.baseline))
    if ctrl:  # the headline baseline: unpruned, rewound and retrained exactly like every trial
        trow.append((f"SimCSE control s=0 (rewound + retrained like the trials; mean of seeds {ctrl['seeds']})",
                     ctrl["test"]))
    if selected:
        trow.append(("SimCSE control s=0, dev-selected (pruning did not win)" if selected.control_won else
                     f"SparseCSE, dev-selected ({_point_label(selected)})", selected.test))
    if inp.findings.best_test:
        trow.append(("best per task over the grid (test-selected, for reference only)", inp.findings.best_test))
    return ["## Test results (Spearman × 100)", "", _table(trow, tasks), ""]


def _over_seeds(inp: ReportInputs) -> list[str]:
    selected, ctrl, tasks = inp.selected, inp.control, inp.tasks
    if not (selected and len(selected.seeds) > 1):
        return []
    rows = [(f"SimCSE (rewound control s=0, seeds {ctrl['seeds']})", _pm(ctrl["test"], ctrl["test_std"], tasks))] if ctrl else []
    rows.append((f"SparseCSE dev-selected ({_point_label(selected)}, seeds {selected.seeds})",
                 _pm(selected.test, selected.test_std, tasks)))
    return [f"## Over seeds: mean ± sample std (ddof = 1, n = {len(selected.seeds)}; test Spearman × 100)", "",
            "Both rows retrain from the pre-trained weights with each seed under the same budget; the control keeps "
            "every head and neuron (sparsity 0), so the difference is the effect of the mask.", "",
            _table(rows, tasks), ""]


def _pareto(inp: ReportInputs) -> list[str]:
    if not (inp.selected and inp.selected.pareto):
        return []
    par = inp.selected.pareto
    return [f"## Pareto front: {inp.dev} vs encoder parameters (`sweep.objective: pareto`)", "",
            f"Points no other point beats on both dev (mean over seeds) and size. Selection takes the smallest model "
            f"within δ = {par['delta']:g} dev points of the best dev ({par['best_dev']:.2f}); test figures are shown, "
            "never used to choose.", "", pareto_table(par["front"], inp.dev), ""]


def _pilot(inp: ReportInputs) -> list[str]:
    if not inp.pilot:
        return []
    return ["## Pilot study: the trained SimCSE pruned, without rewinding or retraining (the paper's Figure 1)", "",
            "STS test (Spearman × 100) of the stage-1 model with each scorer's mask at each sparsity.", "",
            pilot_table(inp.pilot, inp.tasks[:-1]), ""]


def _stability(inp: ReportInputs) -> list[str]:
    stab = inp.findings.stability
    if not stab:
        return []
    return ["## Stability: the best sparsity per task (test, mean over seeds) vs the dev-selected one", "",
            render(["task", "best s (test)", "λ", "its score", "dev-selected's score", "s gap"],
                   [[label(x.task), f"{x.best_sparsity:.0%}",
                     "—" if x.best_sparsity == 0 else f"{x.best_lam} {x.best_reading}".strip(),
                     x.best, x.selected, f"{100 * x.sparsity_gap:+.0f} pts"] for x in stab]), ""]


def _allocation(inp: ReportInputs) -> list[str]:
    if not inp.allocation:
        return []
    sel = inp.selected
    return ["## Where the selected mask prunes (fraction of each layer's heads / FFN neurons)", "",
            f"score.combine = {sel.combine}, score.normalize = {sel.normalize} "
            "(`none` ranks raw scores across layers; `layer` normalises each layer first).", "",
            allocation_table(inp.allocation), ""]


def _align_uniform(inp: ReportInputs) -> list[str]:
    b, bb = inp.baseline, inp.backbone
    return ["## Alignment / uniformity (STS-B test; lower is better)", "",
            f"SimCSE stage 1: align {b['align']:.4f}, uniform {b['uniform']:.4f}"
            + (f"; pre-trained backbone: align {bb['align']:.4f}, uniform {bb['uniform']:.4f}"
               if bb and bb.get("align") is not None else "") + ".", ""]


def _all_trials(inp: ReportInputs) -> list[str]:
    g = lambda v: None if v is None else f"{v:.4f}"  # noqa: E731
    return ["## All trials", "", render(
        ["sparsity", "scorer", "λ", "seed", "status", inp.dev, "test avg", "align", "uniform"],
        [[x["sparsity"], x["method"], str(x["lam"]) if x["scorer"] == PAPER_SCORER else "—", str(x["seed"]),
          f"{x['status']} {x['error'][:60]}", x[DEV], x[metric_key("test", "avg")], g(x["align"]), g(x["uniform"])]
         for x in inp.flat], left=0)]


def _transfer(inp: ReportInputs) -> list[str]:
    if not inp.transfer:
        return []

    transfer = inp.transfer
    best = inp.findings.best_transfer
    if best:
        transfer = {**transfer, "best per task over the grid (test-selected)": best}
    which = (["`eval.transfer: selected`: the seven tasks ran on the models below only — the stage-1 SimCSE, the "
              "s = 0 control and the selected model — not on every trial (`all` runs them there too).", ""]
             if inp.cfg.eval.transfer == "selected" else [])
    return ["", f"## Transfer tasks (accuracy; classifier: {inp.cfg.eval.transfer_classifier})", "", *which,
            format_transfer_markdown(transfer)]


# (section, the figures that belong beside it in report.html)
SECTIONS = ((_intro, ()), (_test_results, ()), (lambda inp: _overlap_lines(inp), ()), (_over_seeds, ()),
            (_pareto, ("pareto.png",)),
            (lambda inp: render_comparisons(inp.findings.comparisons, inp.control, inp.dev), ("sts_avg_vs_sparsity.png", "sts_tasks_vs_sparsity.png")),
            (_pilot, ("pilot.png",)), (_stability, ()), (_allocation, ("mask_allocation.png",)),
            (_align_uniform, ("align_uniform.png",)), (_all_trials, ()), (_transfer, ()))


def render_markdown(inp: ReportInputs) -> str:
    """report.md: the paper's Table 1 (baseline, dev-selected SparseCSE, test-selected best per task), how far the
    test sets overlap the data that chose, the over-seeds table, the Pareto front, the controls, the pilot, stability, the mask's allocation,
    alignment/uniformity, every trial, transfer, then the figures."""
    md = [line for section, _ in SECTIONS for line in section(inp)]
    md[1:1] = ["", "> " + answer(inp)]  # the answer first, as report.html shows it
    md += [line for name in inp.figures for line in ("", f"![{name[:-4]}](figures/{name})")]
    return "\n".join(md) + "\n"


# --------------------------------------------------------------------------- the selection in words

def _scoring_lines(scoring: dict | None, cfg: Config) -> list[str]:
    """What importance was scored on, and the label leak the paper's setting carries."""
    if not scoring:
        return []
    n = upgrade_record("scoring", scoring)["positive_pairs"]
    count = f"{n} " if n is not None else ""
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


def _importance(cfg: Config) -> str:
    sc = cfg.score
    if sc.readings:
        return f"Importance: score.readings = {' | '.join(f'{c}/{n}' for c, n in sc.readings)} (each a grid point). "
    return f"Importance: score.combine = {_values(sc.combine)}, score.normalize = {_values(sc.normalize)}. "


def _replicate_lines(reps: list[dict] | None, spread: tuple | None, dev: str = "STS-B dev") -> list[str]:
    """The stage-1 replicates: how far independent SimCSE runs differ, before any pruning."""
    if not reps or len(reps) < 2:
        return []

    devs = [r[DEV] for r in reps]
    return [f"Stage 1 ran {len(reps)} independent replicates (train.seed {', '.join(str(r['seed']) for r in reps)}), "
            f"each scored and each with its own trials; their best {dev}: "
            f"{', '.join(f'{d:.2f}' for d in devs)} ({_pm1(*spread)}). "
            "Comparisons below are paired within a replicate and tested over replicates (seeds within one are "
            "averaged).", ""]


def _overlap_lines(inp: ReportInputs) -> list[str]:
    """Per test task, its pairs that the data choosing checkpoints and the sweep's point (STS-B dev) or the data
    importance was scored on also hold; and the average over the tasks clean of both, beside the standard one."""
    overlap = (inp.scoring or {}).get("overlap")
    if not overlap:
        return []
    rows = [[o["task"], f"{o['pairs']:,}", f"{o['in_selection']:,}",
             "— (label-free)" if o["in_scoring"] is None else f"{o['in_scoring']:,}"] for o in overlap]
    clean = inp.findings.clean_tasks
    out = ["## Overlap of the test sets with the data that chose", "",
           f"Unique test pairs (either order) that also occur verbatim in {inp.dev} — which picks each trial's "
           "checkpoint and the sweep's point — and in the pairs importance was scored on. A test figure with overlap "
           "is not clean of the choices made on it.", "",
           render(["test task", "pairs", f"in {inp.dev} (selection)", "in the scoring pairs"], rows, left=1), ""]
    if not clean:
        return out + ["No test task is clean of both: every test figure below is partly chosen on its own pairs.", ""]
    line = f"Tasks clean of both: {', '.join(label(t) for t in clean)}."
    sel_avg, ctrl_avg = inp.findings.clean_selected, inp.findings.clean_control
    if sel_avg is not None:
        line += f" Their average for the selected point: {sel_avg:.2f}"
        line += f" (the s = 0 control: {ctrl_avg:.2f})." if ctrl_avg is not None else "."
    return out + [line, ""]


def _stopped_lines(flat: list[dict], cfg: Config) -> list[str]:
    stopped = [x["trial"] for x in flat if x["status"] == "incomplete"]
    if cfg.sweep.scheduler != "asha" or not stopped:
        return []
    return [f"ASHA stopped {len(stopped)} of {len(flat)} trials early (in training steps; they had at least "
            f"{cfg.sweep.asha_grace_steps or 2 * cfg.train.eval_steps} steps): {', '.join(stopped)}. They have no test "
            "figures, are marked `incomplete` below and are excluded from selection.", ""]


def _selection_data_lines(inp: ReportInputs) -> list[str]:
    """What the clean selection data holds (sweep.select_on: clean-dev), per source, and which half reads what."""
    counts = (inp.scoring or {}).get("selection")
    if not counts:
        return []
    rows = [[SELECT_ON.get(c["source"], c["source"]), f"{c['pairs']:,}", f"{c['left_out']:,}", f"{c['checkpoint']:,}",
             f"{c['choice']:,}"] for c in counts]
    return ["The selection data (`sweep.select_on: clean-dev`): STS-B dev and SICK-R dev without any pair that a "
            "reported test set (STS12–16, STS-B test, SICK-R test) also holds, split by a hash of each pair into "
            "two halves — one picks each training run's best checkpoint, the other (held out from it) is what the "
            "sweep chooses on, so no pair is read twice.", "",
            render(["source", "pairs", "left out (in a test set, or repeated)", "checkpoint half", "choice half"],
                   rows, left=1), ""]


def _selection_lines(selected: Selection | None, cfg: Config) -> list[str]:
    if not selected:
        return ["No trial finished: nothing was selected.", ""]
    dev = select_on_label(cfg.sweep.select_on)
    lam = f" (λ fixed at {cfg.sweep.select_lam} for selection)" if cfg.sweep.select_lam is not None else ""
    out = [f"Selection chose among {selected.candidates} grid points{lam}, the s = 0 control included"
           + (f", by the smallest encoder within δ = {selected.pareto['delta']:g} of the best {dev} "
              f"({selected.pareto['best_dev']:.2f}; `sweep.objective: pareto`). " if selected.pareto else ". ")]
    detail = selected.rule_detail
    if selected.control_won:
        what = "the control is exported" if cfg.sweep.when_control_wins == "export_control" else "nothing is exported"
        why = ("no pruned point comes within δ of the best dev" if selected.pareto else
               detail["why"] if detail else f"the s = 0 control has the best {dev}")
        verdict = "No pruned point was shown to hold" if selected.rule == "safe" else "Pruning did not help on dev"
        out[0] += (f"**{verdict}**: {why} ({selected.dev_mean:.2f}); {what} "
                   "(`sweep.when_control_wins`).")
    else:
        out[0] += f"Selected: {_point_label(selected)}, {dev} {selected.dev_mean:.2f}" + (
            f", {selected.params:,} encoder parameters." if selected.params else ".")
    if "STSBenchmark" in selected.test:
        gap = selected.dev_mean - selected.test["STSBenchmark"]
        out[0] += f" Dev/test gap of the selected point ({dev} − STS-B test): {gap:+.2f}."
    return out + [""] + _rule_lines(selected, dev)


def _other_rules(rules: dict | None, cfg: Config) -> list[str]:
    """What each selection rule picks on these same trials (the configured one first)."""
    if not rules or len(rules) < 2:
        return []
    pick = lambda c: "—" if c is None else ("the control" if c["sparsity"] == 0 else f"{c['sparsity']:.0%}")  # noqa
    order = [cfg.sweep.select, *(r for r in rules if r != cfg.sweep.select)]
    return ["On these trials each rule picks: " + "; ".join(f"`{r}` → {pick(rules[r])}" for r in order if r in rules)
            + ".", ""]


def _rule_lines(selected: Selection, dev: str = "STS-B dev") -> list[str]:
    """The selection rule, named, with the tests it made."""
    rule, detail = selected.rule, selected.rule_detail
    if rule == "pareto":
        return []
    if not detail:
        return [f"Selection rule: `sweep.select: best_dev` — the highest mean {dev} (the paper's rule; no test "
                "against the control's noise).", ""]
    head = (f"Selection rule: `sweep.select: {rule}`, margin {detail['margin']:g} {dev} points, α = "
            f"{detail.get('alpha', 0.05)}; chosen: {detail['why']}.")
    if rule == "safe":
        head += (" Sparsities are tested from the least pruned up (each one's best point on the choice data), "
                 "against the s = 0 control on every source of the choice data separately: accepted only where "
                 "every source's one-sided 95 % bound of the difference — the pairs' noise by bootstrap plus training "
                 "noise from the control's retrainings — lies above −margin; the sequence stops at the first failure.")
        rows = [[f"{st['sparsity']:.0%}", str(st["lam"]), f"{st['dev']:.2f}", src, f"{t['diff']:+.2f}",
                 "—" if t.get("lower") is None else f"{t['lower']:+.2f}", f"{t['n_point']} vs {t['n_control']}",
                 str(t["pairs"]), "yes" if t["passed"] else f"no ({t.get('verdict', 'not shown')})"]
                for st in detail["steps"] for src, t in st["sources"].items()]
        table = render(["sparsity", "λ", dev, "source", "Δ vs control", "95 % lower bound", "runs", "pairs",
                        "passed"], rows, left=0) if rows else ""
        return [head, "", *([table, ""] if table else [])]
    if rule == "noninferior":
        head += (" Sparsities are tested from the least pruned up, each sparsity's best-dev point, one-sided against "
                 "the s = 0 control over the seeds (replicates) both ran — with one, by a bootstrap over the dev "
                 "pairs; the sequence stops at the first failure (a fixed sequence keeps the family-wise error at α).")
    rows = [[f"{st['sparsity']:.0%}", str(st["lam"]), f"{st['dev']:.2f}",
             "—" if st.get("diff") is None else f"{st['diff']:+.2f}", str(st["n"]), st.get("test", ""),
             "—" if st.get("p") is None else f"{st['p']:.3f}", "yes" if st["passed"] else "no"]
            for st in detail["steps"]]
    table = render(["sparsity", "λ", dev, "Δ dev vs control", "n", "test", "p (Holm for superior)",
                    "passed"], rows, left=0) if rows else ""
    return [head, "", *([table, ""] if table else [])]


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 10_000 else f"{n:,}"


def answer(inp: ReportInputs) -> str:
    """The report's first paragraph in HTML (markdown): the chosen model, its size against the dense one, its test
    average and its difference to the unpruned control with the 95 % interval."""
    sel = inp.selected
    if not sel:
        return "**No trial finished: nothing was selected.** See *All trials* below."
    dense = next((r.params for r in inp.results if r.finished and r.point.is_control and r.params), None)
    size = ""
    if sel.params and dense:
        size = (f" — {_millions(sel.params)} encoder parameters against {_millions(dense)} dense "
                f"({sel.params / dense - 1:+.1%})")
    avg = sel.test.get("avg")
    what = (("**the s = 0 control** (do not prune)" if sel.rule == "safe" else
             "**the s = 0 control**: pruning did not win on dev") if sel.control_won else
            f"**SparseCSE at {_point_label(sel)}**")
    out = f"Chosen: {what}{size}. STS test average {avg:.2f}" if avg is not None else f"Chosen: {what}{size}."
    comp = selected_comparison(inp.findings.comparisons, sel)
    c = comp.vs_control if comp else None
    if c and c.get("diff") is not None:
        vs = "; against the unpruned control (rewound and retrained the same way): "
        if c.get("bootstrap"):
            b = c["bootstrap"]
            vs += (f"{b['diff']:+.2f} [95 % CI {b['lo']:+.2f}, {b['hi']:+.2f}; one seed, bootstrap over test pairs], "
                   f"{c['verdict']}")
        elif c.get("lo") is not None:
            vs += (f"{c['diff']:+.2f} [95 % CI {c['lo']:+.2f}, {c['hi']:+.2f}; t over {c['n']} seeds; "
                   f"{c.get('test', 'paired t')} {_p(c.get('p_raw', c['p']))}, Holm {_p(c['p'])} in a family of "
                   f"{c.get('family', 1)}], {c['verdict']}")
        else:
            vs += f"{c['diff']:+.2f} (one seed: no interval, no claim)"
        out += vs
    elif sel.control_won and inp.control and "avg" in inp.control["test"]:
        out += " (the unpruned control itself)"
    return out + "." + _clean_evidence(inp) + _speed(inp)


def _speed(inp: ReportInputs) -> str:
    """The export's measured speed, each pruned path against the dense model under sentence-transformers."""
    rows = [r for r in inp.export_speed or [] if r["path"] != "sentence-transformers, dense"]
    if not rows:
        return ""
    st = ("its copy in export/pruned (nothing removed; its padding-free forward) under sentence-transformers"
          if inp.selected and inp.selected.control_won else "the pruned model under sentence-transformers")
    paths = ", ".join((st if r["path"].startswith("sentence-transformers")
                       else f"{r['path'].split(', ', 1)[1]} under ONNX Runtime") + f" {r['x_dense']:.2f}×" for r in rows)
    return f" Speed against the dense model under sentence-transformers, on the exporting machine's CPU: {paths}."


def _clean_evidence(inp: ReportInputs) -> str:
    """The answer's second half: how the choice was made (rule and data) and the verdict on the clean test sets."""
    sel, f, cfg = inp.selected, inp.findings, inp.cfg
    detail = sel.rule_detail or {}
    counts = (inp.scoring or {}).get("selection")
    pairs = (f" ({sum(c['choice'] for c in counts):,} pairs no checkpoint was picked on, no test set holds)"
             if counts else "")
    out = (f" Chosen on {inp.dev}{pairs} by `sweep.select: {sel.rule}`"
           + (f": {detail['why']}" if detail.get("why") else "") + ".")
    if f.clean_tasks and f.clean_selected is not None:
        names = ", ".join(label(t) for t in f.clean_tasks)
        if sel.control_won:
            out += f" On the test sets no choice touched ({names}): {f.clean_selected:.2f}, the control's own."
        elif f.clean_control is not None:
            d = f.clean_selected - f.clean_control
            verdict = ("within" if d >= -cfg.sweep.margin else "beyond") + f" the {cfg.sweep.margin:g}-point margin"
            out += (f" On the test sets no choice touched ({names}): {f.clean_selected:.2f} against the control's "
                    f"{f.clean_control:.2f} ({d:+.2f}, {verdict}).")
    return out


# --------------------------------------------------------------------------- report.html

CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:72rem;margin:0 auto;padding:1rem 1.5rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.answer{background:#f3f7ff;border-left:4px solid #3b6fd6;padding:.6rem 1rem}
table{border-collapse:collapse;display:block;overflow-x:auto;max-width:100%;font-size:13px}
th,td{border:1px solid #ccc;padding:.2rem .5rem}th{background:#f5f5f5}
td{font-variant-numeric:tabular-nums}figure{margin:1rem 0}img{max-width:100%;height:auto}
code{overflow-wrap:anywhere}p{overflow-wrap:anywhere}"""


def _img(name: str, data: bytes) -> str:
    src = base64.b64encode(data).decode()
    return (f'<figure><img src="data:image/png;base64,{src}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(name)}</figcaption></figure>")


def render_html(inp: ReportInputs) -> str:
    """report.html, one self-contained page: the answer first, then report.md's sections as HTML (headings, real
    tables), each figure inlined beside its section, any other figure at the end."""
    from markdown_it import MarkdownIt

    mdit = MarkdownIt("commonmark", {"html": False}).enable("table")
    body, placed = [], set()
    for i, (section, figs) in enumerate(SECTIONS):
        lines = section(inp)
        if i == 0:  # the title, then the answer, then the rest of the introduction
            body += [mdit.render(lines[0]), f'<div class="answer">{mdit.render(answer(inp))}</div>']
            lines = lines[1:]
        if lines:
            body.append(mdit.render("\n".join(lines)))
        for name in figs:
            if name in inp.figures:
                body.append(_img(name, inp.figures[name]))
                placed.add(name)
    body += [_img(name, data) for name, data in inp.figures.items() if name not in placed]
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>SparseCSE report — {html.escape(inp.title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def render_live_html(title: str, flat: list[dict], total: int | None, dev: str = "STS-B dev") -> str:
    """report.html while the sweep runs (rewritten after each trial result): how far it is, the best dev score (on
    `dev`, the selection data) so far, and every trial as it stands; the full report replaces it at the end."""
    from types import SimpleNamespace

    from markdown_it import MarkdownIt

    done = [x for x in flat if x["status"] == "done"]
    devs = [x for x in flat if x.get(DEV) is not None]
    best = max(devs, key=lambda x: x[DEV]) if devs else None
    lines = [f"# SparseCSE report — {title} (sweep in progress)", "",
             f"**{len(done)} of {total if total else '?'} trials finished**, {len(flat) - len(done)} running or "
             "stopped. This page is rewritten after every trial result and replaced by the full report when the sweep "
             "ends; reload it to follow the sweep.", ""]
    if best is not None:
        lines += [f"Best {dev} so far: **{best[DEV]:.2f}** — {best['method']}, sparsity "
                  f"{best['sparsity']}, λ {best['lam']}, seed {best['seed']} ({best['status']}).", ""]
    lines += _all_trials(SimpleNamespace(flat=flat, dev=dev))
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render("\n".join(lines))
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=60>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>SparseCSE (running) — {html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + body + "\n</body></html>\n")
