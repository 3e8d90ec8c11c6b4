"""The one place sparsecse touches Ray's API (Ray's example API changed several times: keep it here).

Everything else is plain torch; these helpers connect, run the stage-1 TorchTrainer, run a Ray task,
and build/restore the Tune sweep.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from . import SparseCSEError


def connect(address: str | None, num_cpus: int | None, dashboard: bool) -> None:
    """Join a cluster (address, or RAY_ADDRESS as set by `ray job submit`) or start a local one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    # workers import sparsecse from wherever this process does (editable install or a job's working dir)
    pkg_root = str(Path(__file__).resolve().parents[1])
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")])),
                        "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:  # Ray ≥ 2.59 turns token authentication on by default for the local cluster it starts
        # address="local": always a fresh local cluster, never a stale one left by `ray start` on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 runtime_env=env, log_to_driver=True)


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


def train_checkpoint_dir() -> Path | None:
    """The latest reported checkpoint (after a worker failure), materialised locally."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    return Path(ckpt.to_directory(tempfile.mkdtemp(prefix="sparsecse-resume-")))


def prepare_ddp(model):
    import ray.train.torch

    return ray.train.torch.prepare_model(model, move_to_device=True)


def train_device():
    import ray.train.torch

    return ray.train.torch.get_device()


def run_torch_trainer(loop: Callable[[dict], None], loop_config: dict, *, num_workers: int, use_gpu: bool,
                      cpus_per_worker: float, storage: Path, name: str, max_failures: int):
    """Stage 1: data-parallel SimCSE on `num_workers` workers; returns the Result's last checkpoint dir."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures),
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
    return Path(result.checkpoint.path)


def _root_cause(e: BaseException) -> str:
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    msg = str(seen).strip().splitlines()
    return (msg[-1] if msg else type(seen).__name__)[:500]


# --------------------------------------------------------------------------- Ray task (stage 2)

def run_task(fn: Callable, *args, num_cpus: float = 1, num_gpus: float = 0) -> Any:
    import ray

    try:
        return ray.get(ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn).remote(*args))
    except ray.exceptions.RayTaskError as e:
        raise SparseCSEError(f"scoring failed: {_root_cause(e)}") from None


# --------------------------------------------------------------------------- Ray Tune (stage 3)

def tune_report(metrics: dict, checkpoint_dir: Path | None) -> None:
    from ray import tune

    ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    tune.report(metrics, checkpoint=ckpt)


def tune_checkpoint_dir() -> Path | None:
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    return Path(ckpt.to_directory(tempfile.mkdtemp(prefix="sparsecse-trial-")))


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def run_tuner(trial_fn: Callable[[dict], None], points: list[dict], *, storage: Path, name: str, cpus: float,
              gpus: float, max_concurrent: int | None, max_failures: int, scheduler: str, resume: bool):
    """Grid of trials (one per point); returns the ResultGrid. `resume` restores an interrupted experiment."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(trial_fn, {"cpu": cpus, "gpu": gpus})
    path = storage / name
    if resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        sched = (ASHAScheduler(metric="stsb_dev", mode="max", grace_period=1) if scheduler == "asha" else None)
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},
            # reuse_actors: a finished trial's process takes the next point (no new process, no re-import of
            # torch/transformers per trial); a crashed one is replaced as usual
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=sched, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1),
        )
    return tuner.fit()


def grid_rows(grid) -> list[dict]:
    """One row per trial: its point, last metrics, error (or None) and checkpoint path."""
    rows = []
    for r in grid:
        cfg = (r.config or {}).get("point", {})
        rows.append({"config": cfg, "metrics": dict(r.metrics or {}),
                     "error": None if r.error is None else _root_cause(r.error),
                     "checkpoint": r.checkpoint.path if r.checkpoint is not None else None,
                     "path": r.path})
    return rows
