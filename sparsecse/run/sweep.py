"""`sparsecse sweep`: the driver. It checks (checks.py), opens the run (rundir.py), then orders the stages: stage 1
and scoring (prepare.py), the trials (ray_adapter.run_trials), the selection (study/select.py), evaluation, export
and the report (outcome.py). It computes nothing heavy itself, so a CPU-only head with `num-cpus: 0` runs it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

from .. import Interrupted, SparseCSEError, TrialsFailed
from ..core.config import Config, load_config
from ..core.results import TrialResult, grid_points
from ..core.storage import cache_root
from ..study import select as choose
from . import ray_adapter as ra
from . import stages
from .checks import (check_config, check_nodes, check_out_outlives_the_job, check_scale, check_sparsities,
                     check_this_machine, data_dir_for, model_path_for_nodes, print_plan, stage1_topology,
                     wait_for_resources)
from .outcome import (LiveReport, check_failures, evaluate_and_export_stage, kept_predictions, report_stage,
                      rule_predictions)
from .plan import count_trials
from .prepare import score_stage, train_stage
from .rundir import Run, open_run, refused_leaves_nothing
from .runlock import RunLock
from .show import closing_block
from .tracking import Tracking


def trials_stage(run: Run, scores) -> list[TrialResult]:
    """Stage 3: one Tune trial per grid point — or, with sweep.search=optuna, the s = 0 controls as a grid and
    Optuna's samples — resumed from storage with --resume; one result per trial, every point accounted for."""
    cfg = run.cfg
    t0 = time.perf_counter()
    scores = scores if isinstance(scores, list) else [scores]  # one per stage-1 replicate
    simcse = [stages.load_simcse_scores(run.store, cfg, r) for r in range(len(scores))]
    one = len(scores) == 1  # one replicate: the Scores themselves, as before replicates; else one per replicate
    params = {"store_uri": run.store.uri, "data_dir": run.data_dir, "cfg_dict": cfg.to_dict(),
              "scores": scores[0] if one else scores, "simcse_scores": simcse[0] if one else simcse}
    # trials of sweeps from before the readings were grid parameters ran the config's first (then only) one
    reading = (cfg.score.combine[0], cfg.score.normalize[0])
    live = LiveReport(run.store.uri, cfg.to_dict(), count_trials(cfg), reading)
    total = count_trials(cfg)
    print(f"[sweep] trials: {total}, {cfg.sweep.max_concurrent_trials or 'as many as fit'} at a time", flush=True)
    tune_run = ra.TuneRun(run.store, cfg.sweep.trial_cpus, cfg.sweep.trial_gpus, cfg.sweep.max_concurrent_trials,
                          cfg.sweep.max_failures, run.resume, run.tracking.logger_settings(), reading,
                          {"write": live, "every_s": 10.0}, total, run.verbose)
    points = grid_points(cfg)
    if cfg.sweep.search == "optuna":
        points = [p for p in points if p.is_control]
    results = ra.run_trials(stages.trial, params, points, tune_run, cfg)
    run.state.timings["tune_s"] = time.perf_counter() - t0
    run.tracking.sync()  # the trials' MLflow / W&B runs (Tune's callbacks wrote them on the driver)
    account_for_points(cfg, results)
    return results


def account_for_points(cfg: Config, results: list[TrialResult]) -> None:
    """Every point of the grid (or every sample of the search, and its s = 0 controls) came back as a trial —
    finished, failed or stopped by the scheduler; anything else is an error naming what is missing (exit 1)."""
    got = {r.point for r in results}
    if cfg.sweep.search == "optuna":
        sampled = [r for r in results if not r.point.is_control]
        controls = {p for p in grid_points(cfg) if p.is_control} - got
        if len(sampled) < cfg.sweep.num_samples or controls:
            raise TrialsFailed(f"the search returned {len(sampled)} of sweep.num_samples={cfg.sweep.num_samples} "
                               f"trials and lacks {len(controls)} s = 0 control(s); rerun with --resume")
        return
    missing = [p for p in grid_points(cfg) if p not in got]
    if missing:
        raise TrialsFailed(f"{len(missing)} grid point(s) came back from Tune with no trial: "
                           f"{', '.join(p.name for p in missing[:10])}{' …' if len(missing) > 10 else ''}; "
                           "rerun with --resume to run them")


@contextlib.contextmanager
def owned_sigint(exit_now=os._exit) -> Iterator[None]:
    """Ctrl-C belongs to the sweep while it runs: the first SIGINT raises KeyboardInterrupt in the main thread
    (Ray's calls run off it, ray_adapter.off_main_thread, so neither Ray Train nor Tune takes the signal), the
    driver stops starting work and exits 130 with the resume command; a second SIGINT exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = []

    def handler(signum, frame):
        hits.append(signum)
        if len(hits) > 1:
            os.write(2, b"sparsecse: interrupted twice; exiting now\n")
            exit_now(130)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_sweep(config_path: str, overrides=None, resume: bool | str = False, address: str | None = None,
              out: str | None = None, data_dir: str | None = None, confirmed: bool = False,
              max_hours: float | None = None, verbose: bool = False, exits_on_interrupt: bool = False) -> dict:
    """Run (or resume) the sweep of `config_path` into `out`; its summary. After Ctrl-C it raises Interrupted
    (whose message is the resume command) once the Ray work it started has stopped and Ray is shut down, so the
    process (a notebook's kernel) can resume or run another sweep. `exits_on_interrupt`: the caller ends the
    process right after (the CLI), which stops that work with it — no waiting for it."""
    out = out or f"runs/{Path(config_path).stem}"
    if ra.calls_in_flight():  # a library caller (a notebook) interrupted an earlier sweep: its Tune/Train still run
        raise SparseCSEError("an interrupted sweep's Ray calls still run in this process (Tune and Train go on in "
                             "their threads after an interrupt); restart the process (the notebook's kernel) first, "
                             "then resume with resume=True")
    with owned_sigint():
        try:
            return _run_sweep(config_path, overrides, resume, address, out, data_dir, confirmed, max_hours, verbose,
                              exits_on_interrupt)
        except KeyboardInterrupt:
            again = " ".join(["sparsecse sweep", shlex.quote(config_path), *(f"--set {shlex.quote(o)}" for o in
                              overrides or []), "--out", shlex.quote(out), "--resume"])
            raise Interrupted(f"interrupted; nothing was lost — resume with: {again}") from None


def _run_sweep(config_path: str, overrides, resume: bool | str, address: str | None, out: str,
               data_dir: str | None, confirmed: bool, max_hours: float | None, verbose: bool,
               exits_on_interrupt: bool) -> dict:
    cfg = model_path_for_nodes(load_config(config_path, overrides))
    check_scale(cfg, confirmed)
    check_config(cfg)
    check_sparsities(cfg)
    on_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    if not on_cluster:
        check_this_machine(cfg)
    data = data_dir_for(cfg, data_dir, on_cluster)
    check_out_outlives_the_job(out)
    store, state, resume = open_run(out, cfg, resume)
    lock = RunLock(store, cfg.ray.lock_stale_s)
    made_root = not store.exists()  # the lock is the first thing a new sweep writes
    t_start, wall_start, interrupted = time.perf_counter(), time.time(), False
    try:
        lock.acquire(resume)  # one driver per run (runlock.py); refused here, nothing of the other's is touched
        with refused_leaves_nothing(store, fresh=not resume, lock=lock, made_root=made_root):
            run = Run(cfg, store, data, state, resume, Tracking(cfg, store), verbose=verbose)  # tracker checked here
            log = driver_log(store)
            ra.ray_logs_to(None if verbose else log)
            if not verbose:
                print(f"[sweep] {store.uri}: Ray's own output goes to {log} (-v shows it here)", flush=True)
            ra.connect(address, cfg.ray.num_cpus, dashboard=os.environ.get("SPARSECSE_DASHBOARD", "1") != "0",
                       timeout_s=cfg.ray.connect_timeout_s, metrics_port=cfg.ray.metrics_export_port, verbose=verbose)
            res = wait_for_resources(cfg, ra.cluster_resources, ra.request_resources,
                                     problems=ra.autoscaler_problems)
            warning = stage1_topology(cfg, ra.compute_nodes())
            if warning:
                print(warning)
            print_plan(run, res, None if confirmed else max_hours)
            check_nodes(run)
            store.write_text("config.yaml", cfg.to_yaml())
            count_driver(state.timings, wall_start)
            run.save()
        return run_stages(run, t_start)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if interrupted and not exits_on_interrupt:
            ra.stop_calls()  # before the lock goes: no second driver while this one's trials still write
        lock.release()
        if not on_cluster or interrupted:
            ra.shutdown(interrupted)
        ra.ray_logs_to(None)


def count_driver(timings: dict, started: float) -> None:
    """A run's timings across the drivers that ran it (a first one, then each --resume): how many there were and
    when the first began (`elapsed_s` at the end: from then to the finish, pauses included). train_s and score_s
    add up every driver's stage-1 and scoring time; tune_s, evaluate_export_s and total_s are the last driver's."""
    timings.setdefault("started", started)
    timings["drivers"] = timings.get("drivers", 0) + 1


def driver_log(store) -> Path:
    """Where Ray's driver-side log lines go: RUN/logs/driver.log on a local run; this machine's cache for a run in
    cloud storage (named after the run)."""
    if store.is_local:
        return Path(store.root) / "logs" / "driver.log"
    return cache_root() / "logs" / store.uri.replace("://", "_").replace("/", "_") / "driver.log"


def run_stages(run: Run, t_start: float) -> dict:
    """Stage 1, scoring, the trials, selection, evaluation/export and the report, in order; returns the summary."""
    cfg, store, state = run.cfg, run.store, run.state
    train_stage(run)
    scores = score_stage(run)
    results = trials_stage(run, scores)
    kept = kept_predictions(run, results)  # what the tested rules test on, read once
    selected = choose.select(results, cfg.sweep.select_lam, cfg.sweep.objective, cfg.sweep.pareto_delta,
                             cfg.sweep.select, cfg.sweep.margin, rule_predictions(cfg.sweep.select, kept))
    extras = evaluate_and_export_stage(run, results, selected)
    summary = report_stage(run, results, selected, extras, scores, kept)
    state.timings["total_s"] = time.perf_counter() - t_start
    state.timings["finished"] = time.time()
    state.timings["elapsed_s"] = state.timings["finished"] - state.timings["started"]
    state.summary = summary
    run.save()
    store.write_json("summary.json", {**summary, "timings": state.timings, "stage_runs": state.stage_runs})
    print("[sweep] done\n" + "\n".join(closing_block(summary)))
    check_failures(summary, cfg)
    return summary
