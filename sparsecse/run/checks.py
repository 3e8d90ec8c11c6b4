"""The checks before anything runs, each failing in one line (exit 2): the config on its own (`check_config`,
`check_sparsities`), this machine or the Ray cluster against what the config asks for (`preflight`,
`wait_for_resources`, `stage1_topology`), every node's view of the data, model and storage (`check_nodes`), and
`sparsecse sweep --check` (`check_run`), which needs no cluster. `print_plan` shows what the sweep will cost."""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .. import SparseCSEError
from ..core.config import TRANSFER_TASKS, Config, load_config
from ..core.staging import check_staged, is_staged_uri
from ..core.storage import Storage, is_uri
from ..method.data import default_data_dir, needed_paths, resolve_data_dir
from ..method.model import intermediate_size, quiet_transformers, resolve_model_path
from ..method.prune import count_pruned
from .plan import count_trials, gpu_type, make_plan, render
from .rundir import Run, open_run
from .runlock import RunLock
from . import ray_adapter as ra
from . import stages


def data_dir_for(cfg: Config, data_dir: str | None, on_cluster: bool) -> str:
    """The data dir the stages read: a staged URI as given (every node fetches and verifies it), else a local
    path made absolute against the driver's working directory (Ray Train and Tune move a worker into a folder of
    their own, where a relative path names nothing) — checked here for a local Ray, left to the nodes (check_nodes)
    on a cluster."""
    given = data_dir or cfg.data.dir
    if is_staged_uri(given):
        return str(given).rstrip("/")
    return str(default_data_dir(given).absolute() if on_cluster else resolve_data_dir(given))


def model_path_for_nodes(cfg: Config) -> Config:
    """`model.name` as the nodes must read it: a relative path to a directory on this machine made absolute (a Ray
    Train or Tune worker runs in a folder of its own, where the relative path would name nothing and read as a hub
    name); a hub name, "minilm", an absolute path or a staged URI as given."""
    name = cfg.model.name
    if is_staged_uri(name) or Path(name).expanduser().is_absolute() or not Path(name).expanduser().is_dir():
        return cfg
    return cfg.replace(model=dataclasses.replace(cfg.model, name=str(Path(name).expanduser().absolute())))


def check_out_outlives_the_job(out: str) -> None:
    """A sweep submitted with `ray job submit --working-dir` runs in Ray's unpacked copy of that folder
    (/tmp/ray/session_…/runtime_resources/working_dir_files/…), which Ray deletes once the job no longer needs it: a
    relative `--out` (the default `runs/<config>` too) would put the whole run there. Refused in one line."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return
    if not ((job.get("runtime_env") or {}).get("working_dir")) or is_uri(out):
        return
    where, here = Path(out).expanduser().absolute(), Path.cwd().absolute()
    if where == here or here in where.parents:
        raise SparseCSEError(f"--out {out}: inside the Ray job's working_dir copy ({here}), which Ray deletes after "
                             "the job; pass --out s3://… (or another storage URI) or an absolute path every node keeps")


def check_this_machine(cfg: Config) -> None:
    """A local Ray: this machine is the cluster, checked before one is started."""
    import torch

    preflight(cfg, cfg.ray.num_cpus or os.cpu_count() or 1, torch.cuda.device_count(), "this machine")


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


def wait_for_resources(cfg: Config, resources, request=None, sleep=time.sleep, clock=time.monotonic,
                       problems=None) -> dict:
    """The cluster's resources once they cover what the config asks for. An autoscaling cluster whose workers
    start at zero adds them only on demand: the driver asks for the config's bundles (`request`, Ray's
    request_resources) and waits up to ray.wait_for_resources_s, saying what it waits for, then withdraws the
    request (Ray Train and Tune ask for their own). While it waits, what the autoscaler reports going wrong
    (`problems`: a launch refused for capacity or quota, a node that failed to start, the autoscaler's own error)
    is printed a line each as it appears; past the wait (or at once, with the wait at 0) the one-line preflight
    error, naming the last such cause."""
    deadline, said, seen = clock() + cfg.ray.wait_for_resources_s, None, []
    try:
        while True:
            res = resources()
            try:
                preflight(cfg, res.get("CPU", 0), res.get("GPU", 0), "the Ray cluster")
                if said is not None:
                    print(f"[sweep] the cluster now has {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
                return res
            except SparseCSEError as e:
                for line in (problems() if problems is not None and said is not None else []):
                    if line not in seen:
                        seen.append(line)
                        print(f"[sweep] autoscaler: {line}")
                if clock() >= deadline:
                    if seen:
                        raise SparseCSEError(f"{e} (after {cfg.ray.wait_for_resources_s:g} s; the autoscaler's last "
                                             f"report: {seen[-1]})") from None
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


def check_nodes(run: Run) -> None:
    """Every node that can run work must read the data, the model and the run's storage — asked on the node —
    and, when the config uses GPUs, every GPU node must compute on one (stages.check_gpu, holding a GPU)."""
    cfg = run.cfg
    nodes = ra.compute_nodes()
    marker = f".node-check-{secrets.token_hex(4)}"
    wait = max(120.0, cfg.ray.connect_timeout_s)  # a node whose storage or GPU never answers is one line, not a hang
    run.store.write_text(marker, "written by the driver; every node must see it\n")
    try:
        paths = needed_paths(cfg.data.train_file, cfg.score.split, cfg.eval.tasks,
                             TRANSFER_TASKS if cfg.eval.transfer != "none" else (), cfg.sweep.select_on)
        found = ra.run_on_each_node(stages.check_node, nodes, run.store.uri, marker, run.data_dir, paths, cfg.model.name,
                                    timeout_s=wait)
    finally:
        run.store.delete(marker)
    gpu_nodes = [n for n in nodes if n["resources"].get("GPU", 0) >= 1]
    gpu_nodes = gpu_nodes if cfg.ray.use_gpu or cfg.sweep.trial_gpus > 0 else []  # only when the config uses GPUs
    if gpu_nodes:  # one GPU held on each, as a trial would hold it
        found.update({k: found[k] + v for k, v in ra.run_on_each_node(
            stages.check_gpu, gpu_nodes, gpus=1, timeout_s=wait).items()})
    for n in nodes:
        if found[n["id"]]:
            raise SparseCSEError(f"node {n['ip']} ({n['id'][:8]}) {found[n['id']][0]}")
    print(f"[sweep] {len(nodes)} node(s) checked: data, model and {run.store.uri} reachable from each"
          + (f"; a GPU computes on each of the {len(gpu_nodes)} GPU node(s)" if gpu_nodes else ""))


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


def check_run(config_path: str, overrides=None, resume: bool | str = False, out: str | None = None,
              data_dir: str | None = None, confirmed: bool = False) -> str:
    """`sparsecse sweep … --check`: everything a sweep refuses with exit 2 that can be known without a Ray cluster —
    the config, the data and model (a staged copy complete in storage), --out (a run another driver holds, a run
    to resume or one that is not there) and that --out can be written — checked and nothing left behind. Run where
    the cluster's pods run (cluster/README.md: the K8s validation Job), so a config error stops before a RayJob
    that KubeRay would retry. Returns the one-line verdict."""
    cfg = model_path_for_nodes(load_config(config_path, overrides))
    check_scale(cfg, confirmed)
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
    check_out_outlives_the_job(out)
    store, state, resuming = open_run(out, cfg, resume)
    note = RunLock(store, cfg.ray.lock_stale_s).check_resume() if resuming else None  # a live driver: refused
    run = (f"would resume {store.uri} (stage 1 {'finished' if state.train_fp else 'not finished'}"
           + (f"; {note}" if note else "") + ")" if resuming else f"would start a new sweep in {store.uri}")
    return f"[check] ok: config {config_path}, data {where}, model {cfg.model.name}; {run}"


MAX_REPLICATES, MAX_TRIALS = 20, 2000  # past these a sweep is refused unless confirmed (--yes)


def check_scale(cfg: Config, confirmed: bool) -> None:
    """A sweep far past anything sensible (a typo such as sweep.replicates=1000000) is refused in one line before
    anything starts, unless confirmed with --yes. Counted without building the grid."""
    if confirmed:
        return
    one = cfg.replace(sweep=dataclasses.replace(cfg.sweep, replicates=1))
    reps, trials = cfg.sweep.replicates, count_trials(one) * cfg.sweep.replicates
    if reps > MAX_REPLICATES:
        raise SparseCSEError(f"config sweep.replicates: {reps} stage-1 runs ({trials:,} trials) is far past anything "
                             f"sensible (more than {MAX_REPLICATES}); lower it, or pass --yes if you mean it")
    if trials > MAX_TRIALS:
        raise SparseCSEError(f"config sweep: {trials:,} trials (more than {MAX_TRIALS:,}); check sparsities × λ × seeds "
                             "× scorers × readings × replicates (`sparsecse plan` prints the cost), or pass --yes")


def print_plan(run: Run, resources: dict, max_hours: float | None = None) -> None:
    """`sparsecse plan` for this sweep on this cluster, printed before anything starts and kept as plan.json (a
    run's measured timings can be held against it), for the GPU type and count the cluster reports (Ray's
    accelerator_type resource; a type the plan does not know is planned as an H100, and says so).
    With `max_hours` (--max-hours), a plan longer than that is refused in one line before stage 1."""

    cfg = run.cfg
    gpus = int(resources.get("GPU", 0))
    detected = gpu_type(resources)
    gpu = (detected or "h100") if gpus and (cfg.sweep.trial_gpus or cfg.ray.use_gpu) else "cpu"
    try:
        data = None if is_staged_uri(run.data_dir) else Path(run.data_dir)
        p = make_plan(cfg, data if data and data.is_dir() else None, gpu, gpus or None,
                      int(resources.get("CPU", 0)) or None)
    except Exception as e:  # noqa: BLE001 - a model or corpus only the nodes can read: no plan, the sweep runs
        print(f"[plan] not available here: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return
    if gpu != "cpu" and detected is None:
        kind = next((k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), "not reported")
        p.notes.append(f"GPU type {kind}: not one the plan knows; planned as an H100 (sparsecse plan --gpu for others)")
    print(render(p))
    if max_hours is not None and p.wall_s > 3600 * max_hours:
        raise SparseCSEError(f"--max-hours {max_hours:g}: the plan above takes {p.wall_s / 3600:.1f} h; shrink the "
                             "grid or the budgets, raise --max-hours, or pass --yes to run it anyway")
    run.store.write_json("plan.json", asdict(p))
