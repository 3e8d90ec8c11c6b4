"""A sweep's run directory as the driver keeps it: the resolved config and the stage fingerprints in sweep.json
(`SweepState`, what a resume reads back), the run the stages share (`Run`), opening a run for a new sweep or a
resume (`open_run`), and taking back what a refused new sweep wrote (`refused_leaves_nothing`).

Run layout (relative to --out; every artifact goes through the run's Storage: a local/NFS path or a URI):
    config.yaml, sweep.json        resolved config; stage fingerprints, timings, summary (resume)
    driver.lock                    the driver that holds the run (runlock.py)
    stage1/                        Ray Train's run of stage 1 (its checkpoints)
    simcse/best, simcse/history.json   the stage-1 SimCSE model (best dev) and its dev curve
    scores.parquet                 stage-2 alignment/uniformity gradients (shared with trials via the object store)
    predictions/<trial>.parquet    each trial's per-pair STS test predictions (the single-seed bootstrap);
                                   <trial>.dev.parquet its dev predictions, when a tested rule has one unit
    tune/                          Ray Tune's experiment: trial checkpoints (…/checkpoint_*/best.json points at
                                   the best dev model); tune-control/, tune-missing/ beside it when used
    models/trials/<trial>/…        each trial's best dev model (uploaded when it improved; checkpoints.py)
    tensorboard/<name>/            TensorBoard runs: stage 1 ("simcse") and one per trial (sweep.loggers)
    mlflow/, wandb/                MLflow's sqlite store + artifacts, W&B offline runs (sweep.loggers; tracking.py)
    plan.json, results.{parquet,json}, summary.json, report.{md,html}, figures/*.png, export/
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import SparseCSEError
from ..core.config import Config, config_from_dict
from ..core.storage import Storage, open_storage, probe_write
from .runlock import LOCK, RunLock
from .tracking import Tracking

SWEEP_FILE = "sweep.json"
CONTROL_EXPERIMENT = "tune-control"  # sweep.search=optuna: the s = 0 controls, run as a grid
MISSING_EXPERIMENT = "tune-missing"  # grid points a restored experiment had lost, run on resume
TRIAL_EXPERIMENTS = ("tune", CONTROL_EXPERIMENT, MISSING_EXPERIMENT)  # every Tune experiment a sweep's trials run in


def reported_trials(store: Storage) -> list[str]:
    """The trials that have reported a result so far ("EXPERIMENT/TRIAL"): Tune writes a trial's result.json
    with its first report and syncs it with the experiment's state."""
    return [f"{exp}/{t}" for exp in TRIAL_EXPERIMENTS for t in store.list(exp) if store.is_file(f"{exp}/{t}/result.json")]


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage1_fingerprint(cd: dict) -> str:
    """What stage 1's model depends on: model, data, train, and the dev data that picks its checkpoint when it is
    not STS-B dev (so fingerprints from before sweep.select_on stay valid)."""
    on = cd.get("sweep", {}).get("select_on", "stsb-dev")
    return fingerprint({k: cd[k] for k in ("model", "data", "train")} | ({"select_on": on} if on != "stsb-dev" else {}))


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
    verbose: bool = False  # Ray's and Tune's own output on the console (`sparsecse sweep -v`)

    def save(self) -> None:
        with self.lock:
            self.store.write_json(SWEEP_FILE, asdict(self.state))


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
            if state.get(key) == stage1_fingerprint(saved):
                state[key] = stage1_fingerprint(upgraded)
        state["config"] = upgraded
    return True


def open_run(out: str, cfg: Config, resume: bool | str) -> tuple[Storage, SweepState, bool]:
    """The run's storage, state and whether it resumes; refuses to overwrite a run or resume one that is not there.
    resume="auto" (--resume-if-exists) continues a sweep found at `out` and starts one otherwise."""
    if not ("://" in out) and Path(out).exists() and not Path(out).is_dir():
        raise SparseCSEError(f"--out {out}: is a file; choose a directory path or a URI such as s3://bucket/run")
    store = open_storage(out, cfg.ray.connect_timeout_s)
    probe_write(store, "--out")  # unwritable: one line; leaves nothing it made (--check relies on it)
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


def replicate_config(cfg: Config, replicate: int) -> Config:
    """Stage 1 of a replicate: the config with train.seed + replicate (its own dropout, init and data order)."""
    if not replicate:
        return cfg
    d = cfg.to_dict()
    return config_from_dict({**d, "train": {**d["train"], "seed": d["train"]["seed"] + replicate}})
