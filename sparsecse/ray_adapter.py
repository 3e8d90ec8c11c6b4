"""The one place sparsecse touches Ray's API (Ray's example API changed several times: keep it here).

Everything else is plain torch; these helpers connect, check every node, run the stage-1 TorchTrainer, run Ray
tasks, and build/restore the Tune sweep — all with the run's storage (storage.py) as Ray's storage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import SparseCSEError

if TYPE_CHECKING:
    from .storage import Storage


def connect(address: str | None, num_cpus: int | None, dashboard: bool) -> None:
    """Join a cluster (address, or RAY_ADDRESS as set by `ray job submit`) or start a local one on 127.0.0.1.

    No runtime_env is passed: under `ray job submit --working-dir .` the job's own runtime env (the uploaded
    checkout, the user's env_vars) is what every worker gets; per-process settings are made in the stages."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # Ray ≥ 2.59 turns token authentication on by default for the local cluster it starts
        # address="local": always a fresh local cluster, never a stale one left by `ray start` on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=True)


def compute_nodes() -> list[dict]:
    """The alive nodes that can run work (CPU or GPU > 0): [{"id", "ip", "resources"}]."""
    import ray

    return [{"id": n["NodeID"], "ip": n.get("NodeManagerAddress", "?"), "resources": n.get("Resources", {})}
            for n in ray.nodes() if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0
                                                        or n.get("Resources", {}).get("GPU", 0) > 0)]


def run_on_each_node(fn: Callable, nodes: list[dict], *args) -> dict[str, Any]:
    """fn(*args) once on every node (pinned, no resources held, so it runs beside anything); {node id: result}."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0)(fn)
    refs = {n["id"]: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False)).remote(*args)
            for n in nodes}
    try:
        return {k: v for k, v in zip(refs, ray.get(list(refs.values())))}
    except ray.exceptions.RayTaskError as e:
        raise SparseCSEError(f"node check failed: {_root_cause(e)}") from None


def cluster_resources() -> dict:
    import ray

    return ray.cluster_resources()


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --------------------------------------------------------------------------- Ray Train (stage 1)

def train_context() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def train_report(metrics: dict, checkpoint_dir: Path | None) -> None:
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=ckpt)


def train_checkpoint(local: Path) -> Path | None:
    """The latest reported checkpoint (after a worker failure), downloaded into `local` (the caller's scratch)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    return None if ckpt is None else Path(ckpt.to_directory(str(local)))


def prepare_ddp(model):
    import ray.train.torch

    return ray.train.torch.prepare_model(model, move_to_device=True)


def train_device():
    import ray.train.torch

    return ray.train.torch.get_device()


def run_torch_trainer(loop: Callable[[dict], None], loop_config: dict, *, num_workers: int, use_gpu: bool,
                      cpus_per_worker: float, storage: "Storage", name: str, max_failures: int) -> str:
    """Stage 1: data-parallel SimCSE on `num_workers` workers; returns the last checkpoint, relative to `storage`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    path, fs = storage.ray_storage()
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface the root cause in one line
        raise SparseCSEError(f"stage-1 training failed: {_root_cause(e)}") from None
    if result.error is not None:
        raise SparseCSEError(f"stage-1 training failed: {_root_cause(result.error)}")
    if result.checkpoint is None:
        raise SparseCSEError("stage-1 training reported no checkpoint")
    return storage.rel(result.checkpoint.path)


def _root_cause(e: BaseException) -> str:
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    msg = str(seen).strip().splitlines()
    return (msg[-1] if msg else type(seen).__name__)[:500]


# --------------------------------------------------------------------------- Ray task (stage 2)

def run_tasks(calls: list[tuple[str, Callable, tuple, dict, float, float]]) -> list[Any]:
    """Run (what, fn, args, kwargs, cpus, gpus) calls as Ray tasks at once, holding those resources; their results
    in order. A failure is one line naming the stage."""
    import ray

    refs = [(what, ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(fn).remote(*args, **kwargs))
            for what, fn, args, kwargs, cpus, gpus in calls]
    out = []
    for what, ref in refs:
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayTaskError as e:
            raise SparseCSEError(f"{what} failed: {_root_cause(e)}") from None
    return out


# --------------------------------------------------------------------------- Ray Tune (stage 3)

def tune_report(metrics: dict, checkpoint_dir: Path | None) -> None:
    from ray import tune

    ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    tune.report(metrics, checkpoint=ckpt)


def tune_checkpoint(local: Path) -> Path | None:
    """The trial's last checkpoint (when Tune restarts it), downloaded into `local` (the caller's scratch)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    return None if ckpt is None else Path(ckpt.to_directory(str(local)))


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


METRIC, MODE = "best_stsb_dev", "max"  # what Tune, its schedulers and selection optimise: STS-B dev
PARAMS_METRIC = "encoder_params"  # the second objective of sweep.objective=pareto, in every trial report
RUNG_ATTR = "rung_step"  # ASHA's clock: training steps, on intermediate evaluations only


def rung(rec: dict) -> dict:
    """The early-stopping clock for one report: the step of an intermediate evaluation; nothing on a trial's last
    training evaluation and its final test report, so a scheduler never stops a trial that finished training."""
    return {} if rec.get("last", True) else {RUNG_ATTR: rec["step"]}


def run_tuner(trial_fn: Callable, params: dict, points: list[dict], *, storage: "Storage", name: str, cpus: float,
              gpus: float, max_concurrent: int | None, max_failures: int, asha: dict | None, resume: bool,
              search: dict | None = None, callbacks: list | None = None):
    """One trial per point, each point's keys (sparsity, lam, seed, scorer, combine, normalize) as Tune parameters
    of their own; `params` shared through the object store; returns the ResultGrid. `asha` = {"grace": steps, "max_t": steps,
    "rf": reduction factor} stops weak trials early, measured in training steps. `resume` restores an
    interrupted experiment from the run's storage. `search` = {"space": {name: ("uniform" | "loguniform", lo, hi)
    | ("choice", values)}, "constants": {...}, "num_samples": n, "seed": s} samples the points with Optuna's TPE
    instead (`points` unused); with "pareto": True it searches dev and encoder size together. `callbacks`: more
    Tune logger callbacks (tracking.py's MLflow / W&B)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(trial_fn, **params), {"cpu": cpus, "gpu": gpus})
    path, fs = storage.ray_storage()
    exp = storage.path(name)
    # one TensorBoard stream per trial: the trial's own (tensorboard/<trial>: per-step loss, lr, dev), not also
    # Tune's TBX copy of its reports; Tune's JSON/CSV results stay (read by the sweep benchmark and by tests)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if resume and tune.Tuner.can_restore(exp, storage_filesystem=fs):
        tuner = tune.Tuner.restore(exp, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        # rungs at grace · rf^k training steps, judged on intermediate evaluations only (see `rung`); max_t only
        # bounds the rungs, it never stops a trial itself
        # a multi-objective search (sweep.objective=pareto) optimises a list of metrics: Tune's own metric stays
        # unset (it would replace the searcher's list) and ASHA names STS-B dev itself
        multi = bool(search and search.get("pareto"))
        sched = (ASHAScheduler(time_attr=RUNG_ATTR, max_t=asha["max_t"], grace_period=asha["grace"],
                               reduction_factor=asha["rf"], stop_last_trials=False,
                               **({"metric": METRIC, "mode": MODE} if multi else {})) if asha else None)
        if search:
            space, alg, num = _optuna(tune, search, max_concurrent)
        else:
            # the grid as points of a search space: every point exactly once, each parameter named in Tune's table;
            # the generator itself must cap concurrency: Tune applies max_concurrent_trials only to the generator
            # it creates
            space = {k: tune.choice(sorted({p[k] for p in points}, key=str)) for k in points[0]}
            alg, num = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent or 0), len(points)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            # reuse_actors: a finished trial's process takes the next point (no new process, no re-import of
            # torch/transformers per trial); a crashed one is replaced as usual
            tune_config=tune.TuneConfig(metric=None if multi else METRIC, mode=None if multi else MODE,
                                        num_samples=num, search_alg=alg,
                                        max_concurrent_trials=max_concurrent, scheduler=sched, reuse_actors=True),
            # num_to_keep=2: Tune forces an experiment-state snapshot whenever a trial has checkpointed num_to_keep
            # times since the last one; with 1 that is every checkpoint (the "snapshotting" warnings)
            run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                      callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), *(callbacks or [])],
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1),
        )
    return tuner.fit()


def _optuna(tune, search: dict, max_concurrent: int | None):
    """(param space, Optuna TPE searcher capped at `max_concurrent`, number of samples)."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform}
    space = dict(search["constants"])
    for k, (kind, *args) in search["space"].items():
        space[k] = tune.choice(args[0]) if kind == "choice" else kinds[kind](*args)
    n = search["num_samples"]
    # TPE models the results after a few random starts (Optuna's default waits for 10, most of a small budget)
    sampler = optuna.samplers.TPESampler(seed=search["seed"], n_startup_trials=max(2, n // 3))
    # sweep.objective=pareto: TPE over both objectives, dev up and encoder size down
    metric, mode = ([METRIC, PARAMS_METRIC], [MODE, "min"]) if search.get("pareto") else (METRIC, MODE)
    alg = OptunaSearch(metric=metric, mode=mode, sampler=sampler)
    return space, (ConcurrencyLimiter(alg, max_concurrent=max_concurrent) if max_concurrent else alg), n


POINT_KEYS = ("sparsity", "lam", "seed", "scorer", "combine", "normalize")


def grid_rows(grid, storage: "Storage") -> list[dict]:
    """One row per trial: its point, last metrics, error (or None) and last checkpoint (relative to the run)."""
    rows = []
    for r in grid:
        cfg = r.config or {}
        cfg = cfg.get("point") or {k: cfg[k] for k in POINT_KEYS if k in cfg}  # "point": sweeps before named params
        rows.append({"config": {"scorer": "align_uniform", **cfg}, "metrics": dict(r.metrics or {}),
                     "error": None if r.error is None else _root_cause(r.error),
                     "checkpoint": storage.rel(r.checkpoint.path) if r.checkpoint is not None else None})
    return rows
