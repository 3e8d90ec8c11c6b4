"""The one place sparsecse touches Ray's API (Ray's example API changed several times: keep it here).

Everything else is plain torch. Ray calls sparsecse, not the other way round: the stage functions (stages.py) take
their reporting and checkpoint hooks as arguments, and this module binds them to Ray Train / Ray Tune. It also
connects, checks every node, runs Ray tasks, builds/restores the Tune sweep with its logger callbacks (TensorBoard
is the trials' own; MLflow / W&B through Tune's integrations) — all with the run's storage (storage.py) as Ray's.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import SparseCSEError
from ..core.config import Config
from ..core.results import DEV, EVALUATED, LAST_DEV, PARAMS, Point, TrialResult, metric_key
from ..core.storage import Storage
from .rundir import CONTROL_EXPERIMENT, MISSING_EXPERIMENT


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables Ray reads, set for one call and restored after it (a driver's env stays its own)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_logs_to(path: Path | None) -> None:
    """Ray's own driver-side log lines (its INFO/WARNING logger output) go to `path` (RUN/logs/driver.log) instead
    of the console; None puts them back on the console (`sparsecse sweep -v`)."""
    import logging

    import ray  # noqa: F401 - importing Ray sets up its "ray" logger and handlers

    log = logging.getLogger("ray")
    for h in [h for h in log.handlers if getattr(h, "_sparsecse", False)]:
        log.removeHandler(h)
        h.close()
    if path is None:
        for h in getattr(log, "_sparsecse_hidden", []):
            log.addHandler(h)
        log._sparsecse_hidden = []
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    hidden = [h for h in log.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for h in hidden:
        log.removeHandler(h)
    log._sparsecse_hidden = getattr(log, "_sparsecse_hidden", []) + hidden
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._sparsecse = True
    log.addHandler(handler)


def connect(address: str | None, num_cpus: int | None, dashboard: bool, timeout_s: float = 60.0,
            metrics_port: int | None = None, verbose: bool = True) -> None:
    """Join a cluster (address, or RAY_ADDRESS as set by `ray job submit`) or start a local one on 127.0.0.1.
    A cluster address is checked first: malformed, or nothing answering there within `timeout_s`, is one line.

    No runtime_env is passed: under `ray job submit --working-dir .` the job's own runtime env (the uploaded
    checkout, the user's env_vars) is what every worker gets; per-process settings are made in the stages.
    `verbose` False: the workers' output (Ray Train's and Tune's chatter, transformers' progress bars) stays in
    Ray's log files instead of being streamed to the console."""
    import ray

    if ray.is_initialized():
        return
    _STOP.clear()
    _STOP_KEY.clear()
    _unsilence()  # a library caller's next sweep after an interrupted one
    given = address or os.environ.get("RAY_ADDRESS")
    if given:
        flag = "--address" if address else "RAY_ADDRESS"
        reach(given, flag, timeout_s)
        try:
            ray.init(address=given, log_to_driver=verbose)
        except (RuntimeError, ConnectionError, ValueError) as e:  # e.g. a token the cluster does not accept
            raise SparseCSEError(f"{flag} {given}: cannot join this Ray cluster ({_root_cause(e)}); check the "
                                 "address and, with token auth, RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH") from None
    else:  # Ray ≥ 2.59 turns token authentication on by default for the local cluster it starts
        # address="local": always a fresh local cluster, never a stale one left by `ray start` on this machine
        # metrics_port: where this node's Prometheus endpoint serves Ray's metrics and the sweep's (a cluster's
        # nodes set theirs with `ray start --metrics-export-port`)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=verbose, **({"_metrics_export_port": metrics_port} if metrics_port else {}))
        _LOCAL_RAY.set()


_LOCAL_RAY = threading.Event()  # set while this driver runs the local Ray it started (connect), cleared by shutdown


def train_env() -> dict[str, str]:
    """What stage 1 sets for Ray Train: its v2 migration warnings off and, on the local Ray this driver started, no
    preemption watcher (a process per stage-1 run, about 200 MB, that polls for spot-instance drains a laptop never
    sees) unless the user set RAY_TRAIN_ENABLE_PREEMPTION_WATCHER. A cluster keeps Ray's default: watched."""
    out = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    if _LOCAL_RAY.is_set() and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ:
        out["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return out


def reach(address: str, flag: str, timeout_s: float) -> None:
    """A Ray address (host:port, ray://host:port, or "auto"/"local") that something answers at within
    `timeout_s`, else one line naming it (instead of Ray retrying the connection forever)."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if address.startswith("ray://") else address
    host, _, port = hostport.rpartition(":")
    if "://" in hostport or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SparseCSEError(f"{flag} {address!r}: not a Ray address; give host:port (the head's GCS, e.g. "
                             "10.0.0.1:6379), ray://host:10001, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = (f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else
               (e.strerror or type(e).__name__).lower())
        raise SparseCSEError(f"{flag} {address}: no Ray cluster answers there ({why}); "
                             "start it (`ray start --head`) or fix the address") from None


def compute_nodes() -> list[dict]:
    """The alive nodes that can run work (CPU or GPU > 0): [{"id", "ip", "resources"}]."""
    import ray

    return [{"id": n["NodeID"], "ip": n.get("NodeManagerAddress", "?"), "resources": n.get("Resources", {})}
            for n in ray.nodes() if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0
                                                        or n.get("Resources", {}).get("GPU", 0) > 0)]


def run_on_each_node(fn: Callable, nodes: list[dict], *args, gpus: float = 0, timeout_s: float | None = None
                     ) -> dict[str, Any]:
    """fn(*args) once on every node (pinned; no resources held unless `gpus`, so it runs beside anything);
    {node id: result}. With `timeout_s`, a check that has not finished by then is one line, not a wait."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, num_gpus=gpus)(fn)
    refs = {n["id"]: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False)).remote(*args)
            for n in nodes}
    try:
        return {k: v for k, v in zip(refs, ray.get(list(refs.values()), timeout=timeout_s))}
    except ray.exceptions.GetTimeoutError:
        for ref in refs.values():
            ray.cancel(ref, force=True)
        raise SparseCSEError(f"node check did not finish within {timeout_s:g} s (a node's {'GPUs' if gpus else 'CPUs'} "
                             "held by something else?); free them or retry") from None
    except ray.exceptions.RayTaskError as e:
        raise SparseCSEError(f"node check failed: {_root_cause(e)}") from None


def cluster_resources() -> dict:
    import ray

    return ray.cluster_resources()


def request_resources(bundles: list[dict]) -> None:
    """Ask the cluster's autoscaler for at least these bundles now ([] withdraws the request): without a demand an
    autoscaler whose workers start at zero never adds the nodes a driver waits for. No autoscaler: no effect."""
    from ray.autoscaler.sdk import request_resources as ask

    ask(bundles=bundles)


def autoscaler_problems() -> list[str]:
    """What the cluster's autoscaler reports going wrong, a line each: node types it cannot launch and why (the
    cloud's category and message: capacity, quota, a bad image), nodes that failed to start, its own last error.
    Read from the status the autoscaler publishes in the GCS (what `ray status` shows); [] without an autoscaler."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return []
    out = []
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    kinds = (report.get("node_availability_summary") or {}).get("node_availabilities") or {}
    for kind, a in sorted(kinds.items()):
        if not a.get("is_available", True):
            info = a.get("unavailable_node_information") or {}
            out.append(f"cannot launch node type {kind}: {info.get('category') or 'error'}: "
                       + " ".join(str(info.get("description") or "no reason given").split())[:300])
    failed: dict = {}
    for _, kind in report.get("failed_nodes") or []:
        failed[kind] = failed.get(kind, 0) + 1
    out += [f"{n} node(s) of type {kind} failed to start (the head's monitor.log has why)" for kind, n in failed.items()]
    error = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_ERROR)
    if error:
        lines = [x for x in error.decode(errors="replace").strip().splitlines() if x.strip()]
        out.append(f"autoscaler error: {lines[-1].strip()[:300]}" if lines else "autoscaler error")
    return out


_STOP = threading.Event()  # set by stop_calls: Tune's loop and Ray Train's controllers wind down
_STOP_KEY: list[str] = []  # the GCS key a stage-1 controller watches (Ray Train's controller runs in its own actor)


def stop_calls(timeout_s: float = 60.0) -> bool:
    """After Ctrl-C in a library caller (a notebook, whose process goes on): stop the work this driver still runs
    in Ray, and wait (at most `timeout_s`) until every off_main_thread call has ended; True when they have. Tune's
    loop ends at its next step (`stop_tune_callback`: its trials are stopped and stay unfinished in the experiment's
    last snapshot, which --resume restores); stage 1's Ray Train controller aborts its workers (`stop_train_callbacks`;
    stage 1 resumes from its last checkpoint); tasks were cancelled already (run_tasks). Then Ray can be shut
    down (`shutdown`) and the process is free for the next sweep."""
    import time

    _STOP.set()
    if _STOP_KEY:
        with contextlib.suppress(Exception):  # Ray going away: nothing left to stop there
            from ray.experimental.internal_kv import _internal_kv_put

            _internal_kv_put(_STOP_KEY[0], b"1", overwrite=True)
    deadline = time.monotonic() + timeout_s
    while calls_in_flight() and time.monotonic() < deadline:
        time.sleep(0.1)
    if _STOP_KEY and not calls_in_flight():  # nothing left to watch it: the cluster's GCS keeps no litter of ours
        with contextlib.suppress(Exception):
            from ray.experimental.internal_kv import _internal_kv_del

            _internal_kv_del(_STOP_KEY[0])
    return not calls_in_flight()


def _stop_key() -> str:
    """The GCS key that asks this driver's stage-1 controllers to stop: new for each connection (connect)."""
    if not _STOP_KEY:
        import uuid

        _STOP_KEY.append(f"sparsecse-stop-{uuid.uuid4().hex}")
    return _STOP_KEY[0]


def stop_tune_callback():
    """A Tune callback that ends Tune's loop at its next step once stop_calls was called: the loop raises, Tune
    stops the trials' actors and leaves its last snapshot as it was (trials running there are resumed by
    Tuner.restore) — the state a killed driver leaves, reached without killing the process."""
    from ray import tune

    class StopOnRequest(tune.Callback):  # pickled with the experiment: the flag is read through a module function
        def on_step_begin(self, iteration, trials, **info):
            if stop_requested():
                raise Stopped("the sweep was interrupted")

    return StopOnRequest()


def stop_requested() -> bool:
    return _STOP.is_set()


class Stopped(Exception):
    """Raised in Tune's loop (on a helper thread) to end it after an interrupt; nobody waits for it."""


def stop_train_callbacks() -> list:
    """Ray Train's controller (an actor of its own) aborts its run once stop_calls has set this driver's key: a
    thread in the controller polls the GCS every half second, then calls the controller's own `abort` (its workers
    stop; the driver's fit raises and its call ends). Needs Ray Train v2 (the default); with v1: none."""
    try:
        from ray.train.v2._internal.constants import is_v2_enabled
        from ray.train.v2._internal.execution.callback import ControllerCallback
    except ImportError:
        return []
    if not is_v2_enabled():
        return []
    key = _stop_key()

    class AbortOnRequest(ControllerCallback):
        def after_controller_start(self, train_run_context):
            threading.Thread(target=self._watch, name="sparsecse-stop-watch", daemon=True).start()

        def _watch(self) -> None:
            import time

            import ray
            from ray.experimental.internal_kv import _internal_kv_get

            me = ray.get_runtime_context().current_actor
            while True:
                time.sleep(0.5)
                try:
                    if _internal_kv_get(key):
                        me.abort.remote()
                        return
                except Exception:  # noqa: BLE001 - the controller is going away
                    return

    return [AbortOnRequest()]


_SILENCED: dict = {}  # Ray's logger level and auto-connect before an interrupt silenced them; connect restores them


def _unsilence() -> None:
    import logging

    from ray._private import auto_init_hook

    if _SILENCED:
        logging.getLogger("ray").setLevel(_SILENCED.pop("level"))
        auto_init_hook.enable_auto_connect = _SILENCED.pop("auto_connect")


def shutdown(interrupted: bool = False) -> None:
    """Disconnect (and stop a local Ray). After Ctrl-C (`interrupted`), Ray's own loggers are silenced (the calls
    Tune and Train still make on their threads fail as the process ends; not the user's news) and Ray's auto-connect
    is turned off (a late call raises instead of starting a new local Ray, whose cut-short start-up printed an error
    after the resume line); Ray is shut down only when no off_main_thread call is in flight: one still calling Ray
    after shutdown makes Ray's C++ end the process with exit 1 ("The core worker has already been shutdown") before
    the resume line. The CLI then exits 130 at once, and the local Ray (fate-shared) or a cluster's job stops with
    the process. A library caller's sweep first stops its Ray work (stop_calls), so that Ray is shut down here; if
    that work has not ended in time, Ray stays connected and run_sweep refuses another sweep in that process."""
    import logging

    import ray
    from ray._private import auto_init_hook

    if interrupted:
        _SILENCED.setdefault("level", logging.getLogger("ray").level)
        _SILENCED.setdefault("auto_connect", auto_init_hook.enable_auto_connect)
        logging.getLogger("ray").setLevel(logging.CRITICAL + 1)
        auto_init_hook.enable_auto_connect = False
    if ray.is_initialized() and not (interrupted and calls_in_flight()):
        ray.shutdown()
    _LOCAL_RAY.clear()


# --------------------------------------------------------------------------- Ray Train (stage 1)

def train_context() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def train_report(metrics: dict, checkpoint_dir: Path | None) -> None:
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    record_metrics("stage1", metrics, {"trial": "stage1", "sparsity": "", "lam": "", "seed": "", "scorer": ""})
    ray.train.report(metrics, checkpoint=ckpt)


# --------------------------------------------------------------------------- Ray metrics (Prometheus, Grafana)

METRIC_TAGS = ("trial", "sparsity", "lam", "seed", "scorer", "state")
METRICS = {"step": "training steps done", LAST_DEV: "STS-B dev Spearman x100 at the last evaluation",
           DEV: "best STS-B dev Spearman x100 so far", "test_avg": "STS test average (x100), when evaluated"}
_gauges: dict = {}


def record_metrics(stage: str, metrics: dict, tags: dict) -> None:
    """A training report as Ray metrics (`sparsecse_<stage>_<name>`, exported by every node's metrics agent on
    Ray's Prometheus endpoint; cluster/grafana-sparsecse.json plots them): what the sweep is doing, per trial,
    where Ray users look. Never fails a run: metrics are for watching."""
    try:
        from ray.util.metrics import Gauge

        state = "evaluated" if metrics.get(EVALUATED) else "training"
        values = {"step": metrics.get("step"), LAST_DEV: metrics.get(LAST_DEV),
                  DEV: metrics.get(DEV), "test_avg": metrics.get(metric_key("test", "avg"))}
        for name, v in values.items():
            if v is None or v != v:  # missing or NaN (ranks other than 0 report no dev score)
                continue
            key = f"sparsecse_{stage}_{name}"
            if key not in _gauges:
                _gauges[key] = Gauge(key, description=METRICS[name], tag_keys=METRIC_TAGS)
            _gauges[key].set(float(v), tags={**tags, "state": state})
    except Exception:  # noqa: BLE001 - no metrics agent (a bare worker), an old Ray: the run goes on
        pass


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


def _train_worker(loop: Callable) -> Callable[[dict], None]:
    """Ray Train's worker function for `loop(loop_config, rank=, world=, device=, wrap=, report=, restored=)`: the
    worker's rank and device, DDP wrapping when there are several workers, Ray Train's report and checkpoint."""

    def train_loop(loop_config: dict) -> None:
        rank, world = train_context()
        loop(loop_config, rank=rank, world=world, device=train_device(), wrap=prepare_ddp if world > 1 else None,
             report=train_report, restored=train_checkpoint)

    return train_loop


HELPER = "sparsecse-ray-call"  # off_main_thread's threads
_CALLS: set[threading.Event] = set()  # one per off_main_thread call still running (set when it ends, then dropped)


def calls_in_flight() -> int:
    """How many off_main_thread calls are still running. Not `Thread.is_alive()`: Python 3.11's `join()`,
    interrupted by Ctrl-C while the thread runs, releases the thread's own lock and marks it stopped (bpo-45274's
    handler), so a helper still deep in Tune's fit reads as dead from then on."""
    return len(_CALLS)


def off_main_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a helper thread, waited for here. Ray Train and Tune each install a SIGINT handler of their own when
    called on the main thread (Train's is never removed, Tune's ends the experiment and returns as if it were done);
    off it they install none, so Ctrl-C stays the driver's (sweep.owned_sigint) and interrupts this wait. The helper
    is a daemon: an interrupted driver does not wait for it at exit. Called off the main thread already (stage 1's
    replicates), fn() runs there. Either way the call counts in calls_in_flight until it ends."""
    done = threading.Event()
    _CALLS.add(done)  # counted from now: the helper may not have started when Ctrl-C comes

    def call() -> Any:
        try:
            return fn()
        finally:
            done.set()
            _CALLS.discard(done)

    if threading.current_thread() is not threading.main_thread():
        return call()
    box: dict = {}

    def target() -> None:
        try:
            box["out"] = call()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    threading.Thread(target=target, name=HELPER, daemon=True).start()
    while not done.wait(0.2):  # an Event, not join(): see calls_in_flight
        pass
    if "error" in box:
        raise box["error"]
    return box["out"]


def run_torch_trainer(loop: Callable, loop_config: dict, *, num_workers: int, use_gpu: bool,
                      cpus_per_worker: float, storage: "Storage", name: str, max_failures: int) -> str:
    """Stage 1: data-parallel SimCSE on `num_workers` workers (`loop` as `_train_worker` calls it); returns the
    last checkpoint, relative to `storage`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    path, fs = storage.ray_storage()
    trainer = TorchTrainer(
        _train_worker(loop), train_loop_config=loop_config,
        # PACK: the workers share one node where one has room for all of them (the all-gather then stays on it;
        # the driver warns when none has, sweep.stage1_topology)
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}, placement_strategy="PACK"),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),  # one resumable kept
                             callbacks=stop_train_callbacks()),
    )
    try:
        with _env(**train_env()):
            result = off_main_thread(trainer.fit)
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
    in order. A failure is one line naming the stage. Submitting and waiting happen off the main thread
    (off_main_thread), so Ctrl-C never lands inside Ray's own Python code; the tasks are then cancelled and their
    end awaited before the driver goes on to shut Ray down (a shutdown racing a force-cancelled task's death
    notice can kill the driver with a C++ stack trace instead of the resume line)."""
    import ray

    refs: list[tuple[str, Any]] = []

    def submit_and_get() -> list[Any]:
        for what, fn, args, kwargs, cpus, gpus in calls:
            refs.append((what, ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(fn).remote(*args, **kwargs)))
        out = []
        for what, ref in refs:
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                raise SparseCSEError(f"{what} failed: {_root_cause(e)}") from None
        return out

    try:
        return off_main_thread(submit_and_get)
    except KeyboardInterrupt:  # Ctrl-C: the tasks stop with the driver, also on a cluster that outlives it
        cancel_and_settle([ref for _, ref in refs])
        raise


def cancel_and_settle(refs: list, settle_s: float = 10.0) -> None:
    """Force-cancel `refs` and wait (at most `settle_s`) until Ray has recorded each one's end."""
    import ray

    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - already finished, or Ray is going away: nothing left to stop
            pass
    if refs:
        try:
            ray.wait(refs, num_returns=len(refs), timeout=settle_s)
        except Exception:  # noqa: BLE001 - the same
            pass


# --------------------------------------------------------------------------- Ray Tune (stage 3)

def tune_report(metrics: dict, checkpoint_dir: Path | None) -> None:
    """A trial's report to Tune, with the node it ran on and ASHA's clock (see `rung`)."""
    from ray import tune

    ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    record_metrics("trial", metrics, {"trial": str(metrics.get("trial", "")), "sparsity": str(metrics.get("sparsity", "")),
                                      "lam": str(metrics.get("lam", "")), "seed": str(metrics.get("seed", "")),
                                      "scorer": str(metrics.get("scorer", ""))})
    tune.report({**metrics, "node_id": node_id(), **rung(metrics)}, checkpoint=ckpt)


def tune_checkpoint(local: Path) -> Path | None:
    """The trial's last checkpoint (when Tune restarts it), downloaded into `local` (the caller's scratch)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    return None if ckpt is None else Path(ckpt.to_directory(str(local)))


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


METRIC, MODE = DEV, "max"  # what Tune, its schedulers and selection optimise: STS-B dev
RUNG_ATTR = "rung_step"  # ASHA's clock: training steps, on intermediate evaluations only


def rung(rec: dict) -> dict:
    """The early-stopping clock for one report: the step of an intermediate evaluation; nothing on a trial's last
    training evaluation and its final test report, so a scheduler never stops a trial that finished training."""
    return {} if rec.get("last", True) else {RUNG_ATTR: rec["step"]}


def _tune_trainable(trial: Callable, reading: tuple[str, str]) -> Callable:
    """Ray Tune's function trainable for `trial(point, report=, restored=, **params)`: the point from Tune's
    parameters (older sweeps' records read with the config's first `reading`), Tune's report and checkpoint."""

    def trial_fn(config: dict, **params) -> None:
        trial(Point.from_params(config, reading), report=tune_report, restored=tune_checkpoint, **params)

    trial_fn.__name__ = "trial"  # Tune names trial directories after the trainable: trial_<id>_…
    return trial_fn


def live_report_callback(live: dict):
    """A Tune callback (on the driver) that rewrites report.html in the run's storage after each trial result, at
    most every `every_s` seconds and at each trial's end: the live report (`live["write"]`, a picklable callable:
    Tune keeps its callbacks with the experiment)."""
    from ray.tune import Callback

    class LiveReport(Callback):
        def __init__(self, live: dict):
            self.live, self.last = live, 0.0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._write(trials, force=False)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write(trials, force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write(trials, force=True)

        def _write(self, trials, force: bool) -> None:
            import time

            if not force and time.monotonic() - self.last < self.live.get("every_s", 10.0):
                return
            self.last = time.monotonic()
            records = [{"config": t.config, "metrics": t.last_result or {},
                        "error": "error" if t.status == "ERROR" else None} for t in trials if t.last_result]
            try:
                self.live["write"](records)
            except Exception as e:  # noqa: BLE001 - a live page must never stop the sweep
                print(f"[sweep] live report not written: {str(e).splitlines()[0][:200]}")

    return LiveReport(live)


def console_callback(total: int | None):
    """A Tune callback (on the driver) that prints one line per trial as it ends: its point, state and scores."""
    from ray.tune import Callback

    class Console(Callback):
        def __init__(self):
            self.ended = 0
            self.done: set[Point] = set()  # a point a restored experiment runs twice (one_per_point) ends once

        def _line(self, trial, state: str) -> None:
            m = trial.last_result or {}
            point = Point.from_params(trial.config or {})
            if state == "done":
                if point in self.done:
                    return
                self.done.add(point)
            self.ended += 1
            scores = ", ".join(f"{k} {m[key]:.2f}" for k, key in (("choice", metric_key("choice", "all")),
                                                                  ("dev", DEV), ("test avg", metric_key("test", "avg")))
                               if isinstance(m.get(key), (int, float)))
            print(f"[trial {self.ended}/{total or '?'}] {point.name}: {state}" + (f" — {scores}" if scores else ""),
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "done" if (trial.last_result or {}).get(EVALUATED) else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info):
            if not _lost_checkpoint(trial):  # a lost one is run_trials' news: it says so once and reruns it
                self._line(trial, "failed (see the report and the trial's log)")

    return Console()


def _lost_checkpoint(trial) -> bool:
    """Whether a trial's latest failure is only that Tune restored it from a checkpoint storage no longer has. Tune
    appends each failure to the trial's local error file before it calls the callbacks (its copy in storage comes
    later)."""
    try:
        local = Path(trial.error_file) if trial.error_file else None
        text = local.read_text() if local and local.is_file() else str(trial.get_error() or "")
        return LOST_CHECKPOINT in text.rsplit("Failure # ", 1)[-1]
    except Exception:  # noqa: BLE001 - its error file unreadable: count it as the failure it reports
        return False


@dataclass(frozen=True)
class TuneRun:
    """How a sweep's trials run: the run's storage, per-trial resources, concurrency, retries, whether to restore an
    interrupted experiment, the trackers (`tracking.Tracking.logger_settings()`: {"mlflow"|"wandb": kwargs}) and
    the reading old records default to."""

    storage: "Storage"
    cpus: float
    gpus: float
    max_concurrent: int | None
    max_failures: int
    resume: bool
    trackers: dict = field(default_factory=dict)
    reading: tuple[str, str] = ("gradient", "none")
    live: dict | None = None  # {"write": callable(records), "every_s": s}: the live report (live_report_callback)
    total: int | None = None  # trials the sweep expects: the console's "[trial k/N]"
    verbose: bool = False  # Tune's own status tables and result boxes on the console (`sparsecse sweep -v`)


def logger_callbacks(trackers: dict) -> list:
    """Tune's own JSON/CSV loggers, and its MLflow / W&B integrations for the trackers the sweep uses."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    out = [JsonLoggerCallback(), CSVLoggerCallback()]
    if "mlflow" in trackers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(**trackers["mlflow"]))
    if "wandb" in trackers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(WandbLoggerCallback(**trackers["wandb"]))
    return out


def run_tuner(trial: Callable, params: dict, points: list[Point], run: TuneRun, *, name: str,
              asha: dict | None = None, search: dict | None = None,
              restart_errored: bool = False) -> list[TrialResult]:
    """One trial per point (each Point key a Tune parameter of its own), `params` shared through the object store;
    one TrialResult per trial. `asha` = {"grace": steps, "max_t": steps, "rf": reduction factor} stops weak trials
    early, measured in training steps. `run.resume` restores an interrupted experiment from the run's storage.
    `search` = {"space": {name: ("uniform" | "loguniform", lo, hi) | ("choice", values)}, "constants": {...},
    "num_samples": n, "seed": s} samples the points with Optuna's TPE instead (`points` unused); with "pareto": True
    it searches dev and encoder size together. `restart_errored`: restore the experiment and run its errored
    trials again from scratch (not from their last checkpoint)."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(_tune_trainable(trial, run.reading), **params),
                                    {"cpu": run.cpus, "gpu": run.gpus})
    path, fs = run.storage.ray_storage()
    exp = run.storage.path(name)
    if (run.resume or restart_errored) and tune.Tuner.can_restore(exp, storage_filesystem=fs):
        tuner = tune.Tuner.restore(exp, trainable=trainable, resume_errored=not restart_errored,
                                   restart_errored=restart_errored, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(trainable, **_tuner_settings(tune, points, run, name, asha, search, path, fs))
    # one TensorBoard stream per trial: the trial's own (tensorboard/<trial>: per-step loss, lr, dev), not also
    # Tune's TBX copy of its reports; Tune's JSON/CSV results stay (read by the sweep benchmark and by tests)
    # quiet (no -v): Tune's new console output prints its experiment box and "View detailed results" whatever the
    # verbosity; its older reporter honours verbose=0 and prints nothing
    quiet = {} if run.verbose else {"RAY_AIR_NEW_OUTPUT": "0"}
    with _env(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1", TUNE_DISABLE_SIGINT_HANDLER="1", **quiet), \
            _optuna_warnings_only(bool(search)):
        grid = off_main_thread(tuner.fit)
    return _trial_results(grid, run)


def _tuner_settings(tune, points: list[Point], run: TuneRun, name: str, asha: dict | None, search: dict | None,
                    path: str, fs) -> dict:
    """tune.Tuner's keyword arguments for a new experiment: the grid (or Optuna's search), ASHA, the run config."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    # rungs at grace · rf^k training steps, judged on intermediate evaluations only (see `rung`); max_t only
    # bounds the rungs, it never stops a trial itself. A multi-objective search (sweep.objective=pareto) optimises
    # a list of metrics: Tune's own metric stays unset (it would replace the searcher's list) and ASHA names
    # STS-B dev itself
    multi = bool(search and search.get("pareto"))
    sched = (ASHAScheduler(time_attr=RUNG_ATTR, max_t=asha["max_t"], grace_period=asha["grace"],
                           reduction_factor=asha["rf"], stop_last_trials=False,
                           **({"metric": METRIC, "mode": MODE} if multi else {})) if asha else None)
    if search:
        space, alg, num = _optuna(tune, search, run.max_concurrent)
    else:
        # the grid as points of a search space: every point exactly once, each parameter named in Tune's table;
        # the generator itself must cap concurrency: Tune applies max_concurrent_trials only to the generator
        # it creates
        rows = [p.params() for p in points]
        space = {k: tune.choice(sorted({r[k] for r in rows}, key=str)) for k in Point.KEYS}
        alg, num = BasicVariantGenerator(points_to_evaluate=rows, max_concurrent=run.max_concurrent or 0), len(rows)
    return {
        "param_space": space,
        # reuse_actors: a finished trial's process takes the next point (no new process, no re-import of
        # torch/transformers per trial); a crashed one is replaced as usual. Concurrency is capped by the search
        # algorithm itself (the grid's generator, Optuna's ConcurrencyLimiter): Tune's max_concurrent_trials only
        # applies to a generator it creates, and warns that it ignores ours
        "tune_config": tune.TuneConfig(metric=None if multi else METRIC, mode=None if multi else MODE,
                                       num_samples=num, search_alg=alg,
                                       scheduler=sched, reuse_actors=True),
        # num_to_keep=1: one checkpoint per trial in storage. Tune then snapshots the experiment state at each
        # checkpoint, which train.checkpoint_every keeps rare (checkpoints.py)
        "run_config": tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                     callbacks=logger_callbacks(run.trackers)
                                     + ([live_report_callback(run.live)] if run.live else [])
                                     + [console_callback(run.total), stop_tune_callback()],
                                     failure_config=tune.FailureConfig(max_failures=run.max_failures),
                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                     verbose=1 if run.verbose else 0),
    }


def _optuna(tune, search: dict, max_concurrent: int | None):
    """(param space, Optuna TPE searcher capped at `max_concurrent`, number of samples)."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform}
    space = dict(search["constants"])
    for k, (kind, *args) in search["space"].items():
        space[k] = tune.choice(args[0]) if kind == "choice" else kinds[kind](*args)
    n = search["num_samples"]
    # TPE models the results after a few random starts (Optuna's default waits for 10, most of a small budget)
    sampler = optuna.samplers.TPESampler(seed=search["seed"], n_startup_trials=max(2, n // 3))
    # sweep.objective=pareto: TPE over both objectives, dev up and encoder size down
    metric, mode = ([METRIC, PARAMS], [MODE, "min"]) if search.get("pareto") else (METRIC, MODE)
    alg = OptunaSearch(metric=metric, mode=mode, sampler=sampler)
    return space, (ConcurrencyLimiter(alg, max_concurrent=max_concurrent) if max_concurrent else alg), n


@contextlib.contextmanager
def _optuna_warnings_only(on: bool) -> Iterator[None]:
    """Optuna's per-trial INFO lines off while a search runs, its log level restored after."""
    if not on:
        yield
        return
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _trial_results(grid, run: TuneRun) -> list[TrialResult]:
    """One TrialResult per trial of a ResultGrid: its point, last metrics, error (one line) and last checkpoint
    (relative to the run)."""
    return [TrialResult(Point.from_params(r.config or {}, run.reading), dict(r.metrics or {}),
                        None if r.error is None else _root_cause(r.error),
                        run.storage.rel(r.checkpoint.path) if r.checkpoint is not None else None)
            for r in grid]


# --------------------------------------------------------------------------- the trials, Tune's quirks included

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


LOST_CHECKPOINT = "does not exist on storage anymore"  # Tune's error for a trial restored from a deleted checkpoint


def one_per_point(results: list[TrialResult]) -> tuple[list[TrialResult], list[Point]]:
    """One result per grid point, in first-seen order — the finished one where a point came back more than once —,
    and the points that did."""
    best: dict[Point, TrialResult] = {}
    twice: list[Point] = []
    for r in results:
        seen = best.get(r.point)
        if seen is None:
            best[r.point] = r
            continue
        if r.point not in twice:
            twice.append(r.point)
        if (r.finished, r.evaluated, not r.error) > (seen.finished, seen.evaluated, not seen.error):
            best[r.point] = r
    return list(best.values()), twice


def run_trials(trial: Callable, params: dict, points: list[Point], run: TuneRun, cfg: Config) -> list[TrialResult]:
    """One result per point of the grid, whatever Tune did on the way — or, with sweep.search=optuna, `points` (the
    s = 0 controls) as a grid in tune-control/ and Optuna's samples in tune/. Tune's recovery quirks stay here:
    trials restored from a checkpoint storage no longer has run again from scratch, and grid points a restored
    experiment lost run in tune-missing/."""
    asha = asha_settings(cfg)
    if cfg.sweep.search == "optuna":
        results = run_tuner(trial, params, points, run, name=CONTROL_EXPERIMENT) if points else []
        return results + run_tuner(trial, params, [], run, name="tune", asha=asha, search=search_space(cfg))
    results = run_tuner(trial, params, points, run, name="tune", asha=asha)
    lost = [r.point.name for r in results if r.error and LOST_CHECKPOINT in r.error]
    if lost:
        # a driver killed between Tune deleting a trial's older checkpoint (num_to_keep=1) and uploading the
        # experiment state that names the newer one restores the trial from a checkpoint that is gone: those
        # trials run again from scratch (their progress is lost, the trial is not)
        print(f"[sweep] {len(lost)} trial(s) restored from a checkpoint no longer in storage "
              f"({', '.join(lost[:5])}); running them again from the start")
        results = run_tuner(trial, params, points, run, name="tune", asha=asha, restart_errored=True)
    results, twice = one_per_point(results)
    if twice:
        # the converse of the lost points below: a restored trial list ahead of the searcher's saved position
        # makes the searcher hand out a point again; its second trial is the same training, kept once
        print(f"[sweep] the restored experiment ran {len(twice)} grid point(s) twice "
              f"({', '.join(p.name for p in twice[:5])}); one result is kept for each")
    got = {r.point for r in results}
    missing = [p for p in points if p not in got]
    if missing and (run.resume or run.storage.exists(MISSING_EXPERIMENT)):
        # a restored experiment can lack points its searcher had already handed out (Tune saves the trial list
        # and the searcher's position as separate files, uploaded one after the other): run them now
        print(f"[sweep] the restored experiment lacks {len(missing)} grid point(s) "
              f"({', '.join(p.name for p in missing[:5])}); running them in {MISSING_EXPERIMENT}/")
        results += run_tuner(trial, params, missing, run, name=MISSING_EXPERIMENT, asha=asha)
    return results
