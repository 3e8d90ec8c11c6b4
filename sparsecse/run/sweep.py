"""`sparsecse sweep`: the driver. It checks, then orders the stages (stages.py) on Ray (ray_adapter.py) and keeps a
small typed state; it computes nothing heavy itself, so a CPU-only head with `num-cpus: 0` runs it.

Every artifact goes through the run's Storage: `--out` is a local/NFS path or a URI (s3://, gs://, abfs://).
Run layout (relative to --out):
    config.yaml, sweep.json        resolved config; stage fingerprints, timings, summary (resume)
    stage1/                        Ray Train's run of stage 1 (its checkpoints)
    simcse/best, simcse/history.json   the stage-1 SimCSE model (best STS-B dev) and its dev curve
    scores.parquet                 stage-2 alignment/uniformity gradients (shared with trials via the object store)
    predictions/<trial>.parquet    each trial's per-pair STS test predictions (the single-seed bootstrap);
                                   <trial>.dev.parquet its dev predictions, when a tested rule has one unit
    tune/                          Ray Tune's experiment: trial checkpoints (…/checkpoint_*/best.json points at
                                   the best dev model)
    models/trials/<trial>/…        each trial's best dev model (uploaded when it improved; checkpoints.py)
    tensorboard/<name>/            TensorBoard runs: stage 1 ("simcse") and one per trial (sweep.loggers)
    mlflow/, wandb/                MLflow's sqlite store + artifacts, W&B offline runs (sweep.loggers; tracking.py)
    results.{parquet,json}, summary.json, report.{md,html}, figures/*.png, export/
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import SparseCSEError, TrialsFailed
from ..core.checkpoints import MODELS, best_model
from ..core.config import TRANSFER_TASKS, Config, config_from_dict, load_config, select_on_label
from ..core.io import parquet_bytes
from ..core.results import TrialResult, grid_points, replicate_name, sts_tasks
from ..core.staging import check_staged, is_staged_uri
from ..core.storage import Storage, open_storage
from ..method.data import default_data_dir, needed_paths, resolve_data_dir
from ..method.evaluate import predictions_from_bytes
from ..method.model import intermediate_size, quiet_transformers, resolve_model_path
from ..method.prune import count_pruned, select_masks
from ..method.score import load_scores
from ..study import figures
from ..study import select as choose
from ..study.report import ReportInputs, render_html, render_live_html, render_markdown
from .plan import count_trials, make_plan, render
from .runlock import LOCK, RunLock
from .tracking import Tracking
from . import ray_adapter as ra
from . import stages

SWEEP_FILE = "sweep.json"


def _fp(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage1_fp(cd: dict) -> str:
    """What stage 1's model depends on: model, data, train, and the dev data that picks its checkpoint when it is
    not STS-B dev (so fingerprints from before sweep.select_on stay valid)."""
    on = cd.get("sweep", {}).get("select_on", "stsb-dev")
    return _fp({k: cd[k] for k in ("model", "data", "train")} | ({"select_on": on} if on != "stsb-dev" else {}))


@dataclass
class SweepState:
    """What sweep.json keeps between runs of the driver (resume)."""

    config: dict
    train_fp: str | None = None  # the stage-1 config whose model simcse/best holds (stage 1 finished)
    stage1_started_fp: str | None = None  # the stage-1 config stage1/ was started with (its checkpoints resume it)
    score_fp: str | None = None
    stage_runs: dict = field(default_factory=lambda: {"train": 0, "score": 0})
    timings: dict = field(default_factory=dict)
    summary: dict | None = None
    replicate_fps: dict = field(default_factory=dict)  # {"<r>": {train_fp, stage1_started_fp, score_fp}}, r ≥ 1

    @classmethod
    def from_dict(cls, d: dict) -> "SweepState":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def fp(self, replicate: int, key: str) -> str | None:
        """A stage fingerprint of a stage-1 replicate (the first keeps the fields above, as before replicates)."""
        return getattr(self, key) if not replicate else self.replicate_fps.get(str(replicate), {}).get(key)

    def set_fp(self, replicate: int, key: str, value: str | None) -> None:
        if not replicate:
            setattr(self, key, value)
        else:
            self.replicate_fps.setdefault(str(replicate), {})[key] = value


@dataclass
class Run:
    cfg: Config
    store: Storage
    data_dir: str
    state: SweepState
    resume: bool
    tracking: Tracking
    lock: threading.RLock = field(default_factory=threading.RLock)  # stage-1 replicates update the state in parallel

    def save(self) -> None:
        with self.lock:
            self.store.write_json(SWEEP_FILE, asdict(self.state))


# --------------------------------------------------------------------------- checks before anything runs

def upgrade_state(state: dict, cfg: Config) -> bool:
    """Whether a saved sweep's config is `cfg`. A sweep.json written by an older sparsecse lacks fields added since;
    they take their defaults (which reproduce the old behaviour), so the config and the stage-1 fingerprint are
    carried over to the new form instead of refusing the resume or retraining stage 1."""
    saved = state["config"]
    try:
        upgraded = config_from_dict(saved).to_dict()
    except SparseCSEError:
        return False
    if upgraded != cfg.to_dict():
        return False
    if saved != upgraded:
        for key in ("train_fp", "stage1_started_fp"):
            if state.get(key) == _stage1_fp(saved):
                state[key] = _stage1_fp(upgraded)
        state["config"] = upgraded
    return True


def check_config(cfg: Config) -> None:
    """Checks that need no hardware: they hold on a laptop and on a cluster alike."""
    if cfg.score.source == "stsb" and cfg.score.split == "test":
        print("sparsecse: warning: score.split=test scores importance on STS-B test pairs, which the report also "
              "evaluates on; its STS-B test figure is not clean (use train, or score.source=unlabeled)", file=sys.stderr)
    if cfg.sweep.search == "optuna":
        for key in ("combine", "normalize"):
            if len(getattr(cfg.score, key)) > 1:
                raise SparseCSEError(f"config score.{key}: one value with sweep.search=optuna (the search samples "
                                     "sparsity and λ only); compare readings with a grid sweep")
    if cfg.train.batch_size % cfg.ray.num_workers:
        raise SparseCSEError(f"config train.batch_size: {cfg.train.batch_size} is not divisible by "
                             f"ray.num_workers={cfg.ray.num_workers}; the global batch is split evenly")


def preflight(cfg: Config, ncpu: float, ngpu: float, where: str) -> None:
    """Resources the config asks for against what the machine/cluster has."""
    if (cfg.ray.use_gpu or cfg.sweep.trial_gpus > 0) and ngpu <= 0:
        key = "ray.use_gpu" if cfg.ray.use_gpu else "sweep.trial_gpus"
        raise SparseCSEError(f"config {key}: asks for a GPU but {where} has none; set {key}="
                             f"{'false' if cfg.ray.use_gpu else '0'} or run on a GPU machine/cluster")
    if cfg.ray.num_workers * cfg.ray.cpus_per_worker > ncpu:
        raise SparseCSEError(f"config ray.num_workers: {cfg.ray.num_workers} workers × {cfg.ray.cpus_per_worker} CPU "
                             f"need more than the {ncpu:g} CPUs {where} has; lower ray.num_workers or ray.cpus_per_worker")
    if cfg.sweep.trial_cpus > ncpu:
        raise SparseCSEError(f"config sweep.trial_cpus: {cfg.sweep.trial_cpus} exceeds the {ncpu:g} CPUs {where} has")


def demand(cfg: Config) -> list[dict]:
    """The resource bundles the config's first stage and a trial need (what an autoscaler is asked to add)."""
    worker = {"CPU": float(cfg.ray.cpus_per_worker), **({"GPU": 1.0} if cfg.ray.use_gpu else {})}
    bundles = [dict(worker) for _ in range(cfg.ray.num_workers)]
    if cfg.sweep.trial_gpus > 0 and not cfg.ray.use_gpu:
        bundles.append({"CPU": float(cfg.sweep.trial_cpus), "GPU": float(cfg.sweep.trial_gpus)})
    return bundles


def wait_for_resources(cfg: Config, resources, request=None, sleep=time.sleep, clock=time.monotonic) -> dict:
    """The cluster's resources once they cover what the config asks for. An autoscaling cluster whose workers
    start at zero adds them only on demand: the driver asks for the config's bundles (`request`, Ray's
    request_resources) and waits up to ray.wait_for_resources_s, saying what it waits for, then withdraws the
    request (Ray Train and Tune ask for their own). Past the wait (or at once, with the wait at 0) the one-line
    preflight error."""
    deadline, said = clock() + cfg.ray.wait_for_resources_s, None
    try:
        while True:
            res = resources()
            try:
                preflight(cfg, res.get("CPU", 0), res.get("GPU", 0), "the Ray cluster")
                if said is not None:
                    print(f"[sweep] the cluster now has {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
                return res
            except SparseCSEError as e:
                if clock() >= deadline:
                    raise
                if said is None and request is not None:
                    request(demand(cfg))
                if said != str(e):
                    said = str(e)
                    print(f"[sweep] waiting up to {deadline - clock():.0f} s for the cluster (its autoscaler is asked "
                          f"for {len(demand(cfg))} bundle(s)): {said}")
                sleep(min(5.0, max(0.1, deadline - clock())))
    finally:
        if said is not None and request is not None:
            request([])


def stage1_topology(cfg: Config, nodes: list[dict]) -> str | None:
    """A warning when stage 1's data-parallel workers cannot share one node: every step then all-gathers the
    batch's embeddings and all-reduces the gradients over the network, slower than one node's GPUs together."""
    if cfg.ray.num_workers <= 1:
        return None
    kind, need = ("GPU", 1.0) if cfg.ray.use_gpu else ("CPU", cfg.ray.cpus_per_worker)
    fit = max((int(n["resources"].get(kind, 0) // need) for n in nodes), default=0)
    if fit >= cfg.ray.num_workers:
        return None
    return (f"[sweep] WARNING: stage 1's {cfg.ray.num_workers} workers (ray.num_workers) span nodes: the largest "
            f"node fits {fit}; each step's all-gather crosses the network. Use nodes with {cfg.ray.num_workers} "
            f"{kind}s (cluster/README.md) or lower ray.num_workers")


def open_run(out: str, cfg: Config, resume: bool | str) -> tuple[Storage, SweepState, bool]:
    """The run's storage, state and whether it resumes; refuses to overwrite a run or resume one that is not there.
    resume="auto" (--resume-if-exists) continues a sweep found at `out` and starts one otherwise."""
    if not ("://" in out) and Path(out).exists() and not Path(out).is_dir():
        raise SparseCSEError(f"--out {out}: is a file; choose a directory path or a URI such as s3://bucket/run")
    store = open_storage(out, cfg.ray.connect_timeout_s)
    if not resume:  # a new sweep into a run another driver is starting or running: say that, not "holds something"
        RunLock(store, cfg.ray.lock_stale_s).refuse_if_held()
    saved = store.read_json(SWEEP_FILE) if store.is_file(SWEEP_FILE) else None
    if resume == "auto":
        resume = saved is not None
    if resume and not saved:
        raise SparseCSEError(f"--resume: {store.uri} holds no sweep ({SWEEP_FILE} missing); drop --resume to start one")
    if not resume and [x for x in store.list() if x != LOCK]:
        what = "a sweep" if saved else "something else"
        raise SparseCSEError(f"--out {store.uri}: already holds {what}; pass --resume to continue it or choose "
                             "another --out")
    if saved and not upgrade_state(saved, cfg):
        raise SparseCSEError(f"--resume: {store.uri} was started with a different config; use the same YAML and "
                             "--set values, or start a new sweep with another --out")
    return store, (SweepState.from_dict(saved) if saved else SweepState(config=cfg.to_dict())), resume


def check_nodes(run: Run) -> None:
    """Every node that can run work must read the data, the model and the run's storage — asked on the node."""
    cfg = run.cfg
    nodes = ra.compute_nodes()
    marker = f".node-check-{secrets.token_hex(4)}"
    run.store.write_text(marker, "written by the driver; every node must see it\n")
    try:
        paths = needed_paths(cfg.data.train_file, cfg.score.split, cfg.eval.tasks,
                             TRANSFER_TASKS if cfg.eval.transfer != "none" else (), cfg.sweep.select_on)
        found = ra.run_on_each_node(stages.check_node, nodes, run.store.uri, marker, run.data_dir, paths, cfg.model.name)
    finally:
        run.store.delete(marker)
    for n in nodes:
        if found[n["id"]]:
            raise SparseCSEError(f"node {n['ip']} ({n['id'][:8]}) {found[n['id']][0]}")
    print(f"[sweep] {len(nodes)} node(s) checked: data, model and {run.store.uri} reachable from each")


# --------------------------------------------------------------------------- stages, in order

def replicate_config(cfg: Config, replicate: int) -> Config:
    """Stage 1 of a replicate: the config with train.seed + replicate (its own dropout, init and data order)."""
    if not replicate:
        return cfg
    d = cfg.to_dict()
    return config_from_dict({**d, "train": {**d["train"], "seed": d["train"]["seed"] + replicate}})


def stage1_slots(cfg: Config, resources: dict) -> int:
    """How many stage-1 runs the cluster holds at once (each needs ray.num_workers × its CPUs and GPU)."""
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    slots = int(resources.get("CPU", 0) // need_cpu) if need_cpu else 1
    if cfg.ray.use_gpu:
        slots = min(slots, int(resources.get("GPU", 0) // cfg.ray.num_workers))
    return max(1, slots)


def train_stage(run: Run) -> None:
    """Stage 1, once per replicate (sweep.replicates): Ray Train SimCSE; its best dev model becomes simcse/best
    (simcse-rep<r>/best). Replicates run as parallel Ray Train runs, as many at once as the cluster holds (each
    run's window is kept in the timings)."""
    from concurrent.futures import ThreadPoolExecutor

    run.state.timings["train_s"] = 0.0
    reps = run.cfg.sweep.replicates
    slots = min(reps, stage1_slots(run.cfg, ra.cluster_resources())) if reps > 1 else 1
    if slots == 1:
        for r in range(reps):
            _train_replicate(run, r)
        return
    print(f"[sweep] stage 1: {reps} replicates, {slots} at a time")
    with ThreadPoolExecutor(slots, thread_name_prefix="stage1") as pool:
        for done in [pool.submit(_train_replicate, run, r) for r in range(reps)]:
            done.result()  # the first failure, in replicate order


def _train_replicate(run: Run, r: int) -> None:
    cfg, st, store = replicate_config(run.cfg, r), run.state, run.store
    simcse, stage1 = replicate_name("simcse", r), replicate_name("stage1", r)
    fp1 = _stage1_fp(cfg.to_dict())
    if st.fp(r, "train_fp") == fp1 and store.is_file(f"{simcse}/best/manifest.json"):
        print(f"[sweep] stage 1 skipped (trained model {store.url(f'{simcse}/best')} matches)")
        return
    t0, start = time.perf_counter(), time.time()
    if run.resume and st.fp(r, "stage1_started_fp") == fp1 and store.exists(stage1):
        # Ray Train finds its checkpoints under stage1/ and hands the newest to the workers (`restored`)
        print(f"[sweep] stage 1 resumes from its last checkpoint in {store.url(stage1)}")
    else:  # a new sweep, or a changed stage-1 config: what stage1/ holds is not this stage 1
        for stale in (simcse, stage1, f"{MODELS}/{stage1}"):
            store.delete(stale)
    with run.lock:
        st.set_fp(r, "stage1_started_fp", fp1)
        run.save()
    ckpt = ra.run_torch_trainer(
        stages.train_loop, {"config": cfg.to_dict(), "data_dir": run.data_dir, "storage": store.uri,
                            "cpus_per_worker": cfg.ray.cpus_per_worker, "name": stage1, "tensorboard": simcse},
        num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, cpus_per_worker=cfg.ray.cpus_per_worker,
        storage=store, name=stage1, max_failures=cfg.ray.max_failures)
    best = best_model(store, ckpt)
    if not store.is_file(f"{best}/manifest.json"):
        raise SparseCSEError(f"stage-1 checkpoint {store.url(ckpt)} has no best model")
    history = store.read_bytes(f"{ckpt}/history.json")
    store.write_bytes(f"{simcse}/history.json", history)  # dev curve + resumes
    store.copy_dir(best, f"{simcse}/best")  # manifest last: simcse/best counts only once complete
    store.delete(f"{MODELS}/{stage1}")  # simcse/best is the copy the sweep reads from now on
    with run.lock:
        st.set_fp(r, "train_fp", fp1)
        st.set_fp(r, "score_fp", None)
        st.stage_runs["train"] += 1
        st.timings["train_s"] = st.timings.get("train_s", 0.0) + time.perf_counter() - t0
        st.timings.setdefault("stage1_windows", {})[str(r)] = [start, time.time()]
        run.save()
    if not r:  # the tracker's stage-1 run is the first replicate's (the report lists every replicate's dev)
        run.tracking.log_stage1(json.loads(history)["history"])


def score_stage(run: Run) -> list:
    """Stage 2, once per replicate: scores.parquet (scores-rep<r>.parquet) from that replicate's stage-1 model;
    returns each replicate's Scores, which its trials share."""
    out, discarded = [], False
    for r in range(run.cfg.sweep.replicates):
        rel = replicate_name("scores.parquet", r)
        if _score_replicate(run, r, rel) and not discarded and run.store.exists("tune"):
            # trials chose their masks from other scores: they are not this sweep's trials
            print("[sweep] the scores changed since the trials ran: their results are discarded and they rerun")
            for stale in (*TRIAL_EXPERIMENTS, "predictions", f"{MODELS}/trials"):
                if run.store.exists(stale):
                    run.store.delete(stale)
            discarded = True
        out.append(load_scores(run.store.read_bytes(rel), name=run.store.url(rel)))
    return out


def _score_replicate(run: Run, r: int, rel: str) -> bool:
    """Scores replicate r unless its file matches its model and settings; whether it scored."""
    cfg, st, store = run.cfg, run.state, run.store
    model = f"{replicate_name('simcse', r)}/best"
    model_fp = _fp(store.read_json(f"{model}/manifest.json"))  # identifies the weights without loading them
    reads = {k: v for k, v in cfg.to_dict()["score"].items() if k not in ("combine", "normalize")}  # not in the file
    fp2 = _fp({"model": model_fp, "score": reads, "eval_pooler": cfg.model.eval_pooler, "max_len": cfg.train.max_len,
               "train_file": cfg.data.train_file if cfg.score.source == "unlabeled" else None})
    if st.fp(r, "score_fp") == fp2 and store.is_file(rel):
        print(f"[sweep] stage 2 skipped ({store.url(rel)} matches the trained model)")
        return False
    t0 = time.perf_counter()
    ra.run_tasks([("scoring", stages.score_task, (store.uri, model, run.data_dir, cfg.to_dict(),
                                                  cfg.sweep.trial_cpus, cfg.sweep.trial_gpus, rel), {},
                   cfg.sweep.trial_cpus, cfg.sweep.trial_gpus)])
    st.set_fp(r, "score_fp", fp2)
    st.stage_runs["score"] += 1
    st.timings["score_s"] = st.timings.get("score_s", 0.0) + time.perf_counter() - t0
    run.save()
    return True


def asha_settings(cfg: Config) -> dict | None:
    """ASHA in training steps: rungs at grace · rf^k steps (grace default: two evaluations) up to the trial's
    budget (max_steps; without it the corpus decides, unknown here, so no bound)."""
    if cfg.sweep.scheduler != "asha":
        return None
    grace = cfg.sweep.asha_grace_steps or 2 * cfg.train.eval_steps
    return {"grace": grace, "max_t": max(grace, cfg.train.max_steps or 10 ** 9), "rf": cfg.sweep.asha_reduction_factor}


def search_space(cfg: Config) -> dict:
    """sweep.search=optuna: continuous sparsity (log or uniform) and λ (continuous or from sweep.lams), the rest
    fixed (seeds[0], the paper's scorer, the one reading)."""
    sw = cfg.sweep
    space = {"sparsity": ("loguniform" if sw.sparsity_scale == "log" else "uniform", *sw.sparsity_range),
             "lam": ("uniform", *sw.lam_range) if sw.lam_range else ("choice", list(sw.lams))}
    return {"space": space, "num_samples": sw.num_samples, "seed": sw.search_seed, "pareto": sw.objective == "pareto",
            "constants": {"seed": sw.seeds[0], "scorer": "align_uniform", "combine": cfg.score.combine[0],
                          "normalize": cfg.score.normalize[0]}}


def trials_stage(run: Run, scores) -> list[TrialResult]:
    """Stage 3: one Tune trial per grid point — or, with sweep.search=optuna, the s = 0 controls as a grid
    ("tune-control") and Optuna's samples ("tune") — resumed from storage with --resume; one result per trial."""
    cfg = run.cfg
    t0 = time.perf_counter()
    scores = scores if isinstance(scores, list) else [scores]  # one per stage-1 replicate
    simcse = [stages.load_simcse_scores(run.store, cfg, r) for r in range(len(scores))]
    one = len(scores) == 1  # one replicate: the Scores themselves, as before replicates; else one per replicate
    params = {"store_uri": run.store.uri, "data_dir": run.data_dir, "cfg_dict": cfg.to_dict(),
              "scores": scores[0] if one else scores, "simcse_scores": simcse[0] if one else simcse}
    # trials of sweeps from before the readings were grid parameters ran the config's first (then only) one
    reading = (cfg.score.combine[0], cfg.score.normalize[0])

    total = count_trials(cfg)
    tune_run = ra.TuneRun(run.store, cfg.sweep.trial_cpus, cfg.sweep.trial_gpus, cfg.sweep.max_concurrent_trials,
                          cfg.sweep.max_failures, run.resume, run.tracking.logger_settings(), reading,
                          {"write": LiveReport(run.store.uri, cfg.to_dict(), total, reading), "every_s": 10.0})
    results = []
    if cfg.sweep.search == "optuna":
        controls = [p for p in grid_points(cfg) if p.is_control]
        if controls:
            results += ra.run_tuner(stages.trial, params, controls, tune_run, name="tune-control")
        results += ra.run_tuner(stages.trial, params, [], tune_run, name="tune", asha=asha_settings(cfg),
                                search=search_space(cfg))
    else:
        results += ra.run_tuner(stages.trial, params, grid_points(cfg), tune_run, name="tune",
                                asha=asha_settings(cfg))
        lost = [r.point.name for r in results if r.error and LOST_CHECKPOINT in r.error]
        if lost:
            # a driver killed between Tune deleting a trial's older checkpoint (num_to_keep=1) and uploading the
            # experiment state that names the newer one restores the trial from a checkpoint that is gone: those
            # trials run again from scratch (their progress is lost, the trial is not)
            print(f"[sweep] {len(lost)} trial(s) restored from a checkpoint no longer in storage "
                  f"({', '.join(lost[:5])}); running them again from the start")
            results = ra.run_tuner(stages.trial, params, grid_points(cfg), tune_run, name="tune",
                                   asha=asha_settings(cfg), restart_errored=True)
        missing = missing_points(cfg, results)
        if missing and (run.resume or run.store.exists(MISSING_EXPERIMENT)):
            # a restored experiment can lack points its searcher had already handed out (Tune saves the trial
            # list and the searcher's position as separate files, uploaded one after the other): run them now
            print(f"[sweep] the restored experiment lacks {len(missing)} grid point(s) "
                  f"({', '.join(p.name for p in missing[:5])}); running them in {MISSING_EXPERIMENT}/")
            results += ra.run_tuner(stages.trial, params, missing, tune_run, name=MISSING_EXPERIMENT,
                                    asha=asha_settings(cfg))
    run.state.timings["tune_s"] = time.perf_counter() - t0
    run.tracking.sync()  # the trials' MLflow / W&B runs (Tune's callbacks wrote them on the driver)
    account_for_points(cfg, results)
    return results


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


MISSING_EXPERIMENT = "tune-missing"  # grid points a restored experiment had lost, run on resume
LOST_CHECKPOINT = "does not exist on storage anymore"  # Tune's error for a trial restored from a deleted checkpoint
TRIAL_EXPERIMENTS = ("tune", "tune-control", MISSING_EXPERIMENT)  # every Tune experiment a sweep's trials run in


def missing_points(cfg: Config, results: list[TrialResult]) -> list:
    """The grid points no trial result came back for (a finished, failed or stopped trial all count)."""
    got = {r.point for r in results}
    return [p for p in grid_points(cfg) if p not in got]


def account_for_points(cfg: Config, results: list[TrialResult]) -> None:
    """Every point of the grid (or every sample of the search, and its s = 0 controls) came back as a trial —
    finished, failed or stopped by the scheduler; anything else is an error naming what is missing (exit 1)."""
    if cfg.sweep.search == "optuna":
        sampled = [r for r in results if not r.point.is_control]
        controls = {p for p in grid_points(cfg) if p.is_control} - {r.point for r in results}
        if len(sampled) < cfg.sweep.num_samples or controls:
            raise TrialsFailed(f"the search returned {len(sampled)} of sweep.num_samples={cfg.sweep.num_samples} "
                               f"trials and lacks {len(controls)} s = 0 control(s); rerun with --resume")
        return
    missing = missing_points(cfg, results)
    if missing:
        raise TrialsFailed(f"{len(missing)} grid point(s) came back from Tune with no trial: "
                           f"{', '.join(p.name for p in missing[:10])}{' …' if len(missing) > 10 else ''}; "
                           "rerun with --resume to run them")


def wants_export(selected: dict | None, cfg: Config) -> bool:
    """Export the selection — the control too when it won on dev, unless sweep.when_control_wins says nothing."""
    return bool(selected and cfg.sweep.export_best and not (
        selected["control_won"] and cfg.sweep.when_control_wins == "export_nothing"))


def evaluate_and_export_stage(run: Run, results: list[TrialResult], selected: dict | None) -> dict:
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
    ctrl = (choose.control(results) or {}).get("checkpoint") if transfer else None
    if transfer:
        calls["selected"] = evaluate("transfer evaluation", best_model(store, selected["checkpoint"]), False, True)
        if ctrl and not selected["control_won"]:
            calls["control"] = evaluate("control transfer evaluation", best_model(store, ctrl), False, True)
    if cfg.sweep.pilot:
        calls["pilot"] = ("pilot study", stages.pilot_task, (store.uri, "simcse/best", *common, *res), {}, *res)
    if wants_export(selected, cfg):
        calls["export"] = ("export", stages.export_task, (store.uri, best_model(store, selected["checkpoint"]), cfg.to_dict(),
                                                          selected.get("test"), res[0], run.data_dir), {}, res[0], 0)
    t0 = time.perf_counter()
    out = dict(zip(calls, ra.run_tasks(list(calls.values()))))
    run.state.timings["evaluate_export_s"] = time.perf_counter() - t0
    table = None
    if transfer:
        table = {"SimCSE": out["baseline"]["transfer"]}
        if "control" in out:
            table["SimCSE control s=0 (rewound + retrained)"] = out["control"]["transfer"]
        table["SparseCSE" if not selected["control_won"] else "SimCSE control s=0 (selected)"] = out["selected"]["transfer"]
    return {"baseline": out["baseline"]["sts"], "transfer": table, "backbone": out["backbone"]["sts"],
            "pilot": out["pilot"] if cfg.sweep.pilot else None}


def report_stage(run: Run, results: list[TrialResult], selected: dict | None, extras: dict, scores) -> dict:
    """results.{parquet,json}, figures, report.{md,html}; returns the summary."""
    cfg, store = run.cfg, run.store
    baseline, transfer = extras["baseline"], extras["transfer"]
    tasks = [*sts_tasks(cfg.eval.tasks), "avg"]
    flat = choose.results_table(results, tasks)
    summary = {"baseline": baseline, "backbone": extras.get("backbone"), "selected": selected,
               "control": choose.control(results), "num_trials": len(results),
               "failed": [{"trial": x["trial"], "error": x["error"]} for x in flat if x["status"] == "error"],
               "transfer": transfer, "storage": store.uri,
               "export": store.url("export") if wants_export(selected, cfg) else None,
               "comparisons": choose.comparisons(results, cfg.sweep.select_lam,
                                                 predictions=predictions_for_bootstrap(run, results)),
               "allocation": selected_allocation(selected, scores[(selected or {}).get("replicate", 0)]),
               "pilot": extras["pilot"], "replicates": replicate_devs(run)}
    table_bytes = parquet_bytes(flat)
    store.write_bytes("results.parquet", table_bytes)
    store.write_json("results.json", {"trials": flat, **summary})
    figs = {name: figures.png(fig) for name, fig in report_figures(cfg, results, summary).items()}
    for name, data in figs.items():
        store.write_bytes(f"figures/{name}", data)
    inputs = ReportInputs(Path(store.root).name, cfg, results, flat, selected, summary["control"], baseline, transfer,
                          figs, summary["allocation"], scores[0].meta, extras["pilot"], extras.get("backbone"),
                          summary["comparisons"], summary["replicates"])
    md, html_text = render_markdown(inputs), render_html(inputs)
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
                    "best_stsb_dev": max(h.get("best_stsb_dev", h["stsb_dev"]) for h in history)})
    return out


def selected_allocation(selected: dict | None, scores) -> dict | None:
    """Where the selected mask prunes (the same masks its trial used); None when nothing is pruned."""
    if not selected or selected["control_won"]:
        return None
    return choose.allocation(*select_masks(*scores.importance(selected["lam"], selected["combine"],
                                                              selected["normalize"]), selected["sparsity"]))


def report_figures(cfg: Config, results: list[TrialResult], summary: dict) -> dict:
    """{file name: figure} of the report, in the order report.md lists them."""
    selected = summary["selected"]
    tasks = [*sts_tasks(cfg.eval.tasks), "avg"]
    figs = figures.sweep_figures(results, tasks, summary["baseline"], summary.get("backbone"),
                                 sampled=cfg.sweep.search == "optuna")
    if summary["allocation"]:
        figs["mask_allocation.png"] = figures.allocation(
            summary["allocation"], f"pruned per layer: s={selected['sparsity']:.0%}, λ={selected['lam']}, "
            f"combine={selected['combine']}, normalize={selected['normalize']}")
    if selected and selected.get("pareto"):
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


def dev_predictions_for_selection(run: Run, results: list[TrialResult]) -> dict:
    """{trial name: its per-pair dev predictions} when a tested selection rule has one unit to test over (then
    each trial kept them, stages.selection_needs_dev_pairs); {} otherwise."""
    if not stages.selection_needs_dev_pairs(run.cfg):
        return {}
    out = {}
    for r in results:
        rel = f"predictions/{r.point.name}.dev.parquet"
        if r.finished and run.store.is_file(rel):
            out[r.point.name] = predictions_from_bytes(run.store.read_bytes(rel))
    return out


def check_failures(summary: dict, cfg: Config) -> None:
    """A sweep whose trials failed is not a success unless the config says failures are tolerated."""
    failed = summary["failed"]
    if failed and not cfg.sweep.allow_failed_trials:
        raise TrialsFailed(f"{len(failed)} of {summary['num_trials']} trials failed (first: {failed[0]['trial']}: "
                           f"{failed[0]['error'][:200]}); the report lists them — set sweep.allow_failed_trials=true "
                           "to accept a sweep with failed trials")
    if summary["selected"] is None:
        raise TrialsFailed("no trial finished, so nothing was selected or exported; see the report's trial table")


# --------------------------------------------------------------------------- the driver

def check_sparsities(cfg: Config) -> None:
    """A sparsity must leave the model at least one head and one FFN neuron (a layer with none is fine: physical
    pruning drops it). Checked on the driver from a local model's config.json (a hub name, or a path that only the
    nodes have, is left to the trials)."""
    if is_staged_uri(cfg.model.name):  # staged in storage: the trials read its shape (no download on the driver)
        return
    path = Path(resolve_model_path(cfg.model.name)).expanduser()
    if not (path / "config.json").is_file():  # a hub name: not looked up from the driver (no network wait here)
        return
    try:
        from transformers import AutoConfig

        with quiet_transformers():
            mc = AutoConfig.from_pretrained(str(path))

        heads = mc.num_hidden_layers * mc.num_attention_heads
        neurons = mc.num_hidden_layers * intermediate_size(mc)
    except Exception:  # noqa: BLE001 - not readable here (a hub name offline, a path on the nodes only)
        return
    top = max(cfg.sweep.sparsity_range) if cfg.sweep.search == "optuna" else max(cfg.sweep.sparsities)
    key = "sweep.sparsity_range" if cfg.sweep.search == "optuna" else "sweep.sparsities"
    if count_pruned(top, heads) >= heads or count_pruned(top, neurons) >= neurons:
        raise SparseCSEError(f"config {key}: {top} removes every attention head or FFN neuron of {cfg.model.name} "
                             f"({heads} heads, {neurons} neurons); keep at least one of each: a sparsity below "
                             f"{1 - 0.5 / min(heads, neurons):.4f}")


@contextlib.contextmanager
def refused_leaves_nothing(store: Storage, fresh: bool, lock: RunLock | None = None, made_root: bool = False):
    """A new sweep refused before its first stage (a cluster check, an unreachable Ray, a tracker that cannot
    open) takes back what it wrote into --out, so the corrected rerun starts as if nothing happened. (A new
    sweep's --out was empty or absent: everything there is its own.) Its lock's heartbeat stops first, so no beat
    writes the lock back after the clean-up."""
    try:
        yield
    except BaseException:
        if fresh:
            if lock is not None:
                lock.release()
            for rel in store.list():
                store.delete(rel)
            if made_root and store.is_local:  # --out did not exist before this sweep: it does not exist after it
                with contextlib.suppress(OSError):
                    os.rmdir(store.root)
        raise


def run_sweep(config_path: str, overrides=None, resume: bool | str = False, address: str | None = None,
              out: str | None = None, data_dir: str | None = None) -> dict:
    cfg = load_config(config_path, overrides)
    check_config(cfg)
    check_sparsities(cfg)
    on_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    if not on_cluster:  # a local Ray: this machine is the cluster, check it before starting one
        import torch

        preflight(cfg, cfg.ray.num_cpus or os.cpu_count() or 1, torch.cuda.device_count(), "this machine")
    # on a cluster the data dir is read by the nodes, not by the driver: check_nodes asks each of them
    given = data_dir or cfg.data.dir
    if is_staged_uri(given):  # staged in storage (`sparsecse data stage`): every node fetches and verifies it
        data = str(given).rstrip("/")
    else:
        data = str(default_data_dir(given) if on_cluster else resolve_data_dir(given))
    store, state, resume = open_run(out or f"runs/{Path(config_path).stem}", cfg, resume)
    lock = RunLock(store, cfg.ray.lock_stale_s)
    made_root = not store.exists()  # the lock is the first thing a new sweep writes
    t_start = time.perf_counter()
    try:
        lock.acquire(resume)  # one driver per run (runlock.py); refused here, nothing of the other's is touched
        with refused_leaves_nothing(store, fresh=not resume, lock=lock, made_root=made_root):
            run = Run(cfg, store, data, state, resume, Tracking(cfg, store))  # a missing tracker fails here
            ra.connect(address, cfg.ray.num_cpus, dashboard=os.environ.get("SPARSECSE_DASHBOARD", "1") != "0",
                       timeout_s=cfg.ray.connect_timeout_s, metrics_port=cfg.ray.metrics_export_port)
            res = wait_for_resources(cfg, ra.cluster_resources, ra.request_resources)
            warning = stage1_topology(cfg, ra.compute_nodes())
            if warning:
                print(warning)
            print_plan(run, res)
            check_nodes(run)
            store.write_text("config.yaml", cfg.to_yaml())
            run.save()
        return run_stages(run, t_start)
    finally:
        lock.release()
        if not on_cluster:
            ra.shutdown()


def check_run(config_path: str, overrides=None, resume: bool | str = False, out: str | None = None,
              data_dir: str | None = None) -> str:
    """`sparsecse sweep … --check`: everything a sweep refuses with exit 2 that can be known without a Ray cluster —
    the config, the data and model (a staged copy complete in storage), --out (a run another driver holds, a run
    to resume or one that is not there) and that --out can be written — checked and nothing left behind. Run where
    the cluster's pods run (cluster/README.md: the K8s validation Job), so a config error stops before a RayJob
    that KubeRay would retry. Returns the one-line verdict."""
    cfg = load_config(config_path, overrides)
    check_config(cfg)
    check_sparsities(cfg)
    given = data_dir or cfg.data.dir
    paths = needed_paths(cfg.data.train_file, cfg.score.split, cfg.eval.tasks,
                         TRANSFER_TASKS if cfg.eval.transfer != "none" else (), cfg.sweep.select_on)
    if is_staged_uri(given):
        check_staged(given, "--data-dir")
        staged = Storage(str(given).rstrip("/")).read_json("manifest.json")["files"]
        missing = [p for p in paths if p not in staged and not any(f.startswith(p + "/") for f in staged)]
        where = f"{given} (staged)"
    else:
        data = default_data_dir(given)
        missing = [p for p in paths if not (data / p).exists()]
        where = str(data)
    if missing:
        raise SparseCSEError(f"data dir {where}: {missing[0]} is missing ({len(missing)} of the sweep's paths); "
                             "fetch or stage the full data (`sparsecse data fetch`, `sparsecse data stage`)")
    if is_staged_uri(cfg.model.name):
        check_staged(cfg.model.name, "model.name")
    out = out or f"runs/{Path(config_path).stem}"
    store, state, resuming = open_run(out, cfg, resume)
    probe = f".check-{secrets.token_hex(4)}"
    made_root = not store.exists()
    try:
        store.write_text(probe, "sparsecse sweep --check: can --out be written?\n")
    finally:
        store.delete(probe)
        if made_root:  # --out did not exist: neither does it after the check (an object store's marker included)
            with contextlib.suppress(OSError):
                store.fs.delete_dir(store.root)
    run = (f"would resume {store.uri} (stage 1 {'finished' if state.train_fp else 'not finished'})" if resuming
           else f"would start a new sweep in {store.uri}")
    return f"[check] ok: config {config_path}, data {where}, model {cfg.model.name}; {run}"


def print_plan(run: Run, resources: dict) -> None:
    """`sparsecse plan` for this sweep on this cluster, printed before anything starts and kept as plan.json (a
    run's measured timings can be held against it). GPU figures are the H100's; `sparsecse plan --gpu` has others."""
    from dataclasses import asdict


    cfg = run.cfg
    gpus = int(resources.get("GPU", 0))
    gpu = "h100" if gpus and (cfg.sweep.trial_gpus or cfg.ray.use_gpu) else "cpu"
    try:
        data = None if is_staged_uri(run.data_dir) else Path(run.data_dir)
        p = make_plan(cfg, data if data and data.is_dir() else None, gpu, gpus or None,
                      int(resources.get("CPU", 0)) or None)
    except Exception as e:  # noqa: BLE001 - a model or corpus only the nodes can read: no plan, the sweep runs
        print(f"[plan] not available here: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return
    print(render(p))
    run.store.write_json("plan.json", asdict(p))


def run_stages(run: Run, t_start: float) -> dict:
    """Stage 1, scoring, the trials, selection, evaluation/export and the report, in order; returns the summary."""
    cfg, store, state = run.cfg, run.store, run.state
    train_stage(run)
    scores = score_stage(run)
    results = trials_stage(run, scores)
    selected = choose.select(results, cfg.sweep.select_lam, cfg.sweep.objective, cfg.sweep.pareto_delta,
                             cfg.sweep.select, cfg.sweep.margin, dev_predictions_for_selection(run, results))
    extras = evaluate_and_export_stage(run, results, selected)
    summary = report_stage(run, results, selected, extras, scores)
    state.timings["total_s"] = time.perf_counter() - t_start
    state.summary = summary
    run.save()
    store.write_json("summary.json", {**summary, "timings": state.timings, "stage_runs": state.stage_runs})
    print(f"[sweep] done: {store.url('report.md')}")
    if selected and selected["control_won"]:
        print(f"[sweep] pruning did not help on dev: the s = 0 control is best (STS-B dev "
              f"{selected['dev_mean']:.2f}); export: {summary['export']}")
    elif selected:
        print(f"[sweep] selected sparsity={selected['sparsity']} λ={selected['lam']} {selected['method']} "
              f"(STS-B dev {selected['dev_mean']:.2f}); export: {summary['export']}")
    check_failures(summary, cfg)
    return summary
