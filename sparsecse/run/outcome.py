"""After the trials: the evaluations and the export as Ray tasks (`evaluate_and_export_stage`), then
results.{parquet,json}, the figures and report.{md,html} (`report_stage`); the live report while the trials run
(`LiveReport`); and whether the sweep counts as a success (`check_failures`)."""

from __future__ import annotations

import time
from pathlib import Path

from .. import TrialsFailed
from ..core.checkpoints import META_FILE, best_model
from ..core.config import Config, config_from_dict, select_on_label
from ..core.io import parquet_bytes
from ..core.results import DEV, LAST_DEV, TrialResult, replicate_name, sts_tasks
from ..core.storage import Storage
from ..method.evaluate import predictions_from_bytes
from ..ops.hub import base_pooler
from ..method.prune import select_masks
from ..study import figures
from ..study import select as choose
from ..study.select import Selection
from ..study.report import ReportInputs, answer, render_html, render_live_html, render_markdown
from .rundir import Run
from . import ray_adapter as ra
from . import stages


def wants_export(selected: Selection | None, cfg: Config) -> bool:
    """Export the selection — the control too when it won on dev, unless sweep.when_control_wins says nothing."""
    return bool(selected and cfg.sweep.export_best and not (
        selected.control_won and cfg.sweep.when_control_wins == "export_nothing"))


def evaluate_and_export_stage(run: Run, results: list[TrialResult], selected: Selection | None) -> dict:
    """The SimCSE baseline (STS; transfer unless eval.transfer is none), the transfer tasks of the selected model and
    of the s = 0 control, the pilot study (sweep.pilot) and the export, as Ray tasks at once; returns {"baseline":
    STS of the stage-1 model, "transfer": {model: table} or None, "backbone": STS of the pre-trained model,
    "pilot": rows or None}."""
    cfg, store = run.cfg, run.store
    res = (cfg.sweep.trial_cpus, cfg.sweep.trial_gpus)
    common = (run.data_dir, cfg.to_dict())
    transfer = cfg.eval.transfer != "none" and selected is not None
    evaluate = lambda what, rel, sts, tr: (what, stages.evaluate_task, (store.uri, rel, *common),  # noqa: E731
                                           {"sts": sts, "transfer": tr, "threads": res[0], "gpus": res[1]}, *res)
    calls = {"baseline": evaluate("baseline evaluation", "simcse/best", True, transfer),
             "backbone": evaluate("backbone evaluation", None, True, False)}
    own = base_pooler(cfg.model.name)
    if own and own != cfg.model.eval_pooler:  # the starting model as its users run it (MiniLM: mean pooling)
        what, fn, args, kw, *r = evaluate("backbone evaluation (its own pooling)", None, True, False)
        calls["backbone_own"] = (what, fn, args, {**kw, "pooler": own}, *r)
    ctrl = (choose.control(results) or {}).get("checkpoint") if transfer else None
    if transfer:
        calls["selected"] = evaluate("transfer evaluation", best_model(store, selected.checkpoint), False, True)
        if ctrl and not selected.control_won:
            calls["control"] = evaluate("control transfer evaluation", best_model(store, ctrl), False, True)
    if cfg.sweep.pilot:
        calls["pilot"] = ("pilot study", stages.pilot_task, (store.uri, "simcse/best", *common, *res), {}, *res)
    if wants_export(selected, cfg):
        calls["export"] = ("export", stages.export_task, (store.uri, best_model(store, selected.checkpoint), cfg.to_dict(),
                                                          selected.test, res[0], run.data_dir), {}, res[0], 0)
    t0 = time.perf_counter()
    print(f"[sweep] after the trials: {', '.join(c[0] for c in calls.values())}…", flush=True)
    out = dict(zip(calls, ra.run_tasks(list(calls.values()))))
    run.state.timings["evaluate_export_s"] = time.perf_counter() - t0
    table = None
    if transfer:
        table = {"SimCSE": out["baseline"]["transfer"]}
        if "control" in out:
            table["SimCSE control s=0 (rewound + retrained)"] = out["control"]["transfer"]
        table["SparseCSE" if not selected.control_won else "SimCSE control s=0 (selected)"] = out["selected"]["transfer"]
    meta = "export/pruned/" + META_FILE
    speed = store.read_json(meta).get("speed") if "export" in out and store.is_file(meta) else None
    return {"baseline": out["baseline"]["sts"], "transfer": table, "backbone": out["backbone"]["sts"],
            "backbone_own": {"pooler": own, "sts": out["backbone_own"]["sts"]} if "backbone_own" in out else None,
            "pilot": out["pilot"] if cfg.sweep.pilot else None, "export_speed": speed}


def report_stage(run: Run, results: list[TrialResult], selected: Selection | None, extras: dict, scores,
                 kept: dict | None = None) -> dict:
    """results.{parquet,json}, figures, report.{md,html}; returns the summary. `kept`: the trials' kept
    predictions (kept_predictions), for what every rule picks."""
    cfg, store = run.cfg, run.store
    baseline, transfer = extras["baseline"], extras["transfer"]
    tasks = [*sts_tasks(cfg.eval.tasks), "avg"]
    flat = choose.results_table(results, tasks)
    comps = choose.comparisons(results, cfg.sweep.select_lam, predictions=predictions_for_bootstrap(run, results))
    summary = {"baseline": baseline, "backbone": extras.get("backbone"), "backbone_own": extras.get("backbone_own"),
               "selected": selected.to_dict() if selected else None,
               "control": choose.control(results), "num_trials": len(results),
               "failed": [{"trial": x["trial"], "error": x["error"]} for x in flat if x["status"] == "error"],
               "transfer": transfer, "storage": store.uri,
               "export": store.url("export") if wants_export(selected, cfg) else None,
               "export_speed": extras.get("export_speed"),
               "comparisons": [c.to_dict() for c in comps],
               "allocation": selected_allocation(selected, scores[selected.replicate if selected else 0]),
               "pilot": extras["pilot"], "replicates": replicate_devs(run),
               "rules": rule_choices(cfg, results, kept or kept_predictions(run, results))
               if cfg.sweep.objective == "dev" else None}
    table_bytes = parquet_bytes(flat)
    store.write_bytes("results.parquet", table_bytes)
    store.write_json("results.json", {"trials": flat, **summary})
    figs = {name: figures.png(fig) for name, fig in report_figures(cfg, results, selected, summary).items()}
    for name, data in figs.items():
        store.write_bytes(f"figures/{name}", data)
    inputs = ReportInputs(Path(store.root).name, cfg, results, flat, selected, summary["control"], baseline, transfer,
                          figs, summary["allocation"], scores[0].meta, extras["pilot"], extras.get("backbone"),
                          summary["replicates"],
                          choose.findings(results, selected, tasks, cfg.sweep.select_lam, comps=comps,
                                          overlap=scores[0].meta.get("overlap"), replicates=summary["replicates"],
                                          rules=summary["rules"]), backbone_own=extras.get("backbone_own"),
                          export_speed=extras.get("export_speed"))
    md, html_text = render_markdown(inputs), render_html(inputs)
    summary["answer"] = answer(inputs)  # the report's first paragraph: what `sparsecse show` and the console print
    summary["report"] = store.url("report.html")
    store.write_text("report.md", md)
    store.write_text("report.html", html_text)
    run.tracking.log_outcome(summary, {"report.md": md.encode(), "report.html": html_text.encode(),
                                       "results.parquet": table_bytes,
                                       **{f"figures/{k}": v for k, v in figs.items()}},
                             "export" if summary["export"] else None)
    return summary


def replicate_devs(run: Run) -> list[dict]:
    """Each stage-1 replicate's seed and best STS-B dev: the spread between SimCSE runs, which a gain from pruning
    has to exceed."""
    out = []
    for r in range(run.cfg.sweep.replicates):
        history = run.store.read_json(f"{replicate_name('simcse', r)}/history.json")["history"]
        out.append({"replicate": r, "seed": run.cfg.train.seed + r,
                    DEV: max(h.get(DEV, h[LAST_DEV]) for h in history)})
    return out


def selected_allocation(selected: Selection | None, scores) -> dict | None:
    """Where the selected mask prunes (the same masks its trial used); None when nothing is pruned."""
    if not selected or selected.control_won:
        return None
    return choose.allocation(*select_masks(*scores.importance(selected.lam, selected.combine, selected.normalize),
                                           selected.sparsity))


def report_figures(cfg: Config, results: list[TrialResult], selected: Selection | None, summary: dict) -> dict:
    """{file name: figure} of the report, in the order report.md lists them."""
    tasks = [*sts_tasks(cfg.eval.tasks), "avg"]
    figs = figures.sweep_figures(results, tasks, summary["baseline"], summary.get("backbone"),
                                 sampled=cfg.sweep.search == "optuna")
    if summary["allocation"]:
        figs["mask_allocation.png"] = figures.allocation(
            summary["allocation"], f"pruned per layer: s={selected.sparsity:.0%}, λ={selected.lam}, "
            f"combine={selected.combine}, normalize={selected.normalize}")
    if selected and selected.pareto:
        figs["pareto.png"] = figures.pareto(choose.candidate_points(results, cfg.sweep.select_lam), selected)
    if summary["pilot"]:
        figs["pilot.png"] = figures.pilot(summary["pilot"])
    return figs


def predictions_for_bootstrap(run: Run, results: list[TrialResult]) -> dict:
    """{trial name: its per-pair STS test predictions} when some grid point has a single seed — the comparisons
    that seeds cannot test get a bootstrap over test pairs instead; {} otherwise (nothing to read)."""
    if len(run.cfg.sweep.seeds) > 1:
        return {}
    out = {}
    for r in results:
        rel = f"predictions/{r.point.name}.parquet"
        if not r.error and r.evaluated and run.store.is_file(rel):
            out[r.point.name] = predictions_from_bytes(run.store.read_bytes(rel))
    return out


def rule_choices(cfg: Config, results: list[TrialResult], kept: dict) -> dict:
    """{rule: {"sparsity": what it chooses (0: the control), "trial": the trial it would export}} on these trials
    (None where nothing finished), for every selection rule the kept predictions (`kept_predictions`) support —
    what the report and results.json set beside the configured rule's choice."""
    out = {}
    for rule in ("best_dev", "noninferior", "safe"):
        preds = rule_predictions(rule, kept)
        if rule != "best_dev" and not preds:
            continue
        sel = choose.select(results, cfg.sweep.select_lam, rule=rule, margin=cfg.sweep.margin, dev_predictions=preds)
        out[rule] = None if sel is None else {"sparsity": sel.sparsity, "trial": sel.trial}
    return out


def kept_predictions(run: Run, results: list[TrialResult]) -> dict[str, dict]:
    """{"dev" | "choice": {trial name: its per-pair predictions}} of the finished trials that kept them
    (predictions/<trial>.dev.parquet, .choice.parquet), read once for every rule that tests on them."""
    out: dict[str, dict] = {"dev": {}, "choice": {}}
    for r in results:
        for suffix, preds in out.items():
            rel = f"predictions/{r.point.name}.{suffix}.parquet"
            if r.finished and run.store.is_file(rel):
                preds[r.point.name] = predictions_from_bytes(run.store.read_bytes(rel))
    return out


def rule_predictions(rule: str, kept: dict) -> dict:
    """What a rule tests on: the choice pairs, per source, for "safe"; the dev pairs for the other tested rules."""
    return kept["choice"] if rule == "safe" else ({} if rule == "best_dev" else kept["dev"])


def check_failures(summary: dict, cfg: Config) -> None:
    """A sweep whose trials failed is not a success unless the config says failures are tolerated."""
    failed = summary["failed"]
    if failed and not cfg.sweep.allow_failed_trials:
        raise TrialsFailed(f"{len(failed)} of {summary['num_trials']} trials failed (first: {failed[0]['trial']}: "
                           f"{failed[0]['error'][:200]}); the report lists them — set sweep.allow_failed_trials=true "
                           "to accept a sweep with failed trials")
    if summary["selected"] is None:
        raise TrialsFailed("no trial finished, so nothing was selected or exported; see the report's trial table")


class LiveReport:
    """report.html while the trials run (Tune calls it from the driver after trial results,
    ray_adapter.live_report_callback): every trial as it stands. Picklable (Tune keeps its callbacks with the
    experiment): the run's storage is reopened from its URI."""

    def __init__(self, store_uri: str, cfg_dict: dict, total: int, reading: tuple[str, str]):
        self.store_uri, self.cfg_dict, self.total, self.reading = store_uri, cfg_dict, total, reading

    def __call__(self, records: list[dict]) -> None:
        cfg = config_from_dict(self.cfg_dict)
        store = Storage(self.store_uri)
        results = [TrialResult.from_record(r, self.reading) for r in records]
        flat = choose.results_table(results, [*sts_tasks(cfg.eval.tasks), "avg"])
        store.write_text("report.html", render_live_html(Path(store.root).name, flat, self.total,
                                                         select_on_label(cfg.sweep.select_on)))
