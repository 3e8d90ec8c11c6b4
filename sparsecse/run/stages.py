"""The sweep's stages as plain functions: what runs on a cluster node, not how it is scheduled (sweep.py orders
them; ray_adapter.py runs each as a Ray Train worker loop, a Ray task or a Tune trial). Nothing here imports Ray:
a stage that reports progress or resumes gets `report(metrics, checkpoint_dir)` and `restored(local_dir)` as
arguments, which the adapter binds to Ray Train / Ray Tune and a unit test binds to a list.

Every stage gets the run's storage URI, never a path on the driver's disk: it downloads what it reads into
node-local scratch, computes, uploads what it writes, and removes its scratch. So a stage may land on any node of a
cluster whose nodes share no filesystem (storage.py).

    train_loop     stage 1: SimCSE on one Ray Train worker (rank 0 reports checkpoints)
    score_task     stage 2: per-batch alignment/uniformity gradients of every head and neuron -> scores.parquet
    trial          stage 3: masks at (sparsity, λ), rewind, retrain, STS test of the best dev checkpoint
    evaluate_task  the SimCSE baseline (and transfer tasks of a model) for the report
    export_task    the selected checkpoint as dense + physically pruned export -> export/
    check_node     before anything runs: can this node read the data, the model and the run's storage?
    check_gpu      before anything runs, holding one GPU of a GPU node: can torch compute on it with this driver?
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import SparseCSEError
from ..core.checkpoints import Persist
from ..core.config import Config, config_from_dict
from ..core.results import DEV, EVALUATED, LAST_DEV, PARAMS, Point, metric_key, replicate_name, sts_tasks
from ..core.staging import is_staged_uri, local as local_data
from ..core.storage import Storage, fetch_model, scratch_dir
from ..method.data import clean_counts, overlap_counts, selection_all, selection_pairs
from ..method.evaluate import cosine_scores, encode, evaluate_sts, predictions_to_bytes, spearman
from ..method.model import load_encoder
from ..method.prune import encoder_params, masks_for, rewind
from ..method.score import (compute_infonce_scores, load_scores, score_importance, scores_to_bytes,
                             simcse_sentences)
from ..method.train import Dist, OnReport, dev_pairs, train_simcse
from ..method.transfer import evaluate_transfer
from ..study.pilot import pilot, sparsities_with_zero
from ..ops.export import export_model

Report = Callable[[dict, "Path | None"], None]  # report(metrics, checkpoint dir or None)
Restored = Callable[[Path], "Path | None"]  # restored(local dir): the last checkpoint downloaded there, or None


def setup_worker(threads: float) -> None:
    """Per-process settings of a task or trial (not pushed through the runtime env: a user's env stays theirs)."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, int(threads)))


@dataclass(frozen=True)
class OnNode:
    """What every stage starts from on the node it landed on: the config, the run's storage and this node's copy
    of the data (a staged URI fetched and verified here; None when the stage reads no data)."""
    cfg: Config
    store: Storage
    data_dir: Path | None


def on_node(store_uri: str, cfg_dict: dict, data_dir: str | None, threads: float) -> OnNode:
    """The stage preamble, once: this process's threads set, the config rebuilt, storage opened, data localised."""
    setup_worker(threads)
    return OnNode(config_from_dict(cfg_dict), Storage(store_uri), local_data(data_dir) if data_dir else None)


def task_device(gpus: float) -> str:
    """Where a task or trial computes: the GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES), or the CPU when it was
    given none. Given a GPU that CUDA cannot use (old driver, a CPU-only torch wheel, a node that declares a GPU it
    lacks), it fails in one line naming the node and what it saw — never trains on the CPU while holding a GPU."""
    import torch

    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        import socket

        raise SparseCSEError(
            f"node {socket.gethostname()}: Ray gave this task {gpus:g} GPU but torch {torch.__version__} cannot use "
            f"CUDA (torch built for CUDA {torch.version.cuda or 'none: a CPU-only wheel'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, "
            f"{torch.cuda.device_count()} device(s) visible); install a CUDA build of torch that matches the node's "
            "driver, or run with sweep.trial_gpus=0 / ray.use_gpu=false")
    return "cuda"


def gpu_peak_gib(device: str) -> float | None:
    """The most GPU memory this process's torch held (reserved: what another trial packed on the GPU cannot use),
    in GiB; None on the CPU. What `sweep.trial_gpus` < 1 must fit: each trial's figure is in results.json."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None


# CUDA major version → the oldest Linux driver that runs it (NVIDIA's CUDA compatibility table; within a major
# version minor-version compatibility applies): torch 2.13's default CUDA 13.0 wheel needs a 580 driver
MIN_DRIVER = {11: (450, 80), 12: (525, 60), 13: (580, 65)}


def driver_version() -> str | None:
    """This node's NVIDIA driver version ("580.65.06"), from the kernel module or nvidia-smi; None when neither
    answers (no driver, or a container started without the NVIDIA runtime)."""
    import re
    import subprocess

    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        try:
            text = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"(?:Module(?: for \S+)?\s+|^)(\d+\.\d+(?:\.\d+)?)", text.strip(), re.M)
    return m.group(1) if m else None


def check_gpu() -> list[str]:
    """What keeps this node's GPU from training (empty: usable). Runs as a task holding one GPU on each GPU node
    before stage 1: a matmul on the device Ray gave it; when that fails, a driver older than torch's CUDA build
    needs is named as the cause. A GPU that computes passes whatever its driver's version (an image with NVIDIA's
    forward-compatibility libraries runs a newer CUDA on an older data-centre driver)."""
    import torch

    build, drv = torch.version.cuda, driver_version()
    facts = (f"driver {drv or 'not found'}, torch {torch.__version__} built for CUDA "
             f"{build or 'none (a CPU-only wheel)'}")
    old = None
    if build and drv:
        need = MIN_DRIVER.get(int(build.split(".")[0]))
        if need and tuple(int(x) for x in drv.split(".")[:2]) < need:
            old = (f"GPU: driver {drv} is older than torch's CUDA {build} needs (>= {need[0]}.{need[1]}); use a "
                   "node image with a newer driver (cluster/README.md), or a torch built for an older CUDA")
    try:
        _gpu_matmul()
    except SparseCSEError:
        return [old or f"GPU: torch cannot use the GPU Ray gave this check ({facts}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); check the driver and the container's NVIDIA "
                "runtime (NVIDIA_VISIBLE_DEVICES), or run with sweep.trial_gpus=0 and ray.use_gpu=false"]
    except RuntimeError as e:
        return [old or f"GPU: a CUDA matmul failed ({facts}): {str(e).splitlines()[0][:200]}"]
    return []


def _gpu_matmul() -> None:
    """A small matmul on the GPU Ray gave this task (task_device refuses one torch cannot use)."""
    import torch

    task_device(1)
    x = torch.ones(64, 64, device="cuda")
    float((x @ x).sum())


def installed_callbacks(where: str, rank: int, store: Storage) -> list:
    """Training callbacks named in SPARSECSE_CALLBACKS ("module:Class,…"), each built as Class(where, rank, store)
    in the worker that trains (`where` is "stage1" or the trial's name): monitoring hooks of a user's own, and how
    the reliability tests inject their faults (tests/faults.py). Set it in the environment the workers inherit."""
    import importlib


    out = []
    for spec in filter(None, os.environ.get("SPARSECSE_CALLBACKS", "").split(",")):
        mod, _, name = spec.strip().partition(":")
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise SparseCSEError(f"SPARSECSE_CALLBACKS: cannot load {spec!r} ({e}); give module:Class importable "
                                 "on every node") from None
        out.append(cls(where, rank, store))
    return out


class TensorBoardSync:
    """A training callback: after every evaluation, the run's TensorBoard events so far go to storage
    (tensorboard/<name>), so curves are visible while a stage runs and survive a trial stopped early."""

    def __init__(self, store: Storage, local: Path, name: str):
        self.store, self.local, self.rel = store, local, f"tensorboard/{name}"

    def on_train_start(self, model, optimizer) -> None:
        pass

    def on_report(self, metrics: dict, checkpoint) -> None:
        if self.local.is_dir():
            self.store.upload_dir(self.local, self.rel, replace=False)


# --------------------------------------------------------------------------- stage 1: Ray Train worker loop

def train_loop(loop_config: dict, *, rank: int = 0, world: int = 1, device=None, wrap=None,
               report: Report, restored: Restored) -> None:
    """Runs on every stage-1 worker: SimCSE with the global batch split across `world` workers (`wrap`: DDP)."""
    node = on_node(loop_config["storage"], loop_config["config"], loop_config["data_dir"],
                   loop_config["cpus_per_worker"])
    cfg, store = node.cfg, node.store
    if cfg.ray.use_gpu:
        task_device(1)  # a worker given a GPU that CUDA cannot use fails here, in one line (never trains on CPU)
    name = loop_config.get("name", "stage1")  # stage1, stage1-rep<r> (sweep.replicates)
    persist = Persist(store, name, report, owner=rank == 0)
    with scratch_dir("stage1") as tmp:
        tb = tmp / "tensorboard" if rank == 0 and "tensorboard" in cfg.sweep.loggers else None
        sync = [TensorBoardSync(store, tb, loop_config.get("tensorboard", "simcse"))] if tb else []
        callbacks = [*installed_callbacks(name, rank, store), *sync, OnReport(persist)]
        train_simcse(cfg, tmp / "out", node.data_dir,
                     dist=Dist(rank, world, device or "cpu", wrap), callbacks=callbacks,
                     resume_dir=persist.restore(restored(tmp / "resume")), tb_dir=tb, progress=False)


# --------------------------------------------------------------------------- stage 2: scoring task

def score_task(store_uri: str, model_rel: str, data_dir: str, cfg_dict: dict, threads: float, gpus: float,
               out: str = "scores.parquet") -> dict:
    node = on_node(store_uri, cfg_dict, data_dir, threads)
    cfg, store, data_dir = node.cfg, node.store, node.data_dir
    with scratch_dir("score") as tmp:
        enc = load_encoder(str(fetch_model(store, model_rel, tmp))).to(task_device(gpus))
        sc, pairs = score_importance(enc, cfg, data_dir)  # what `sparsecse score` runs too
        if "simcse" in cfg.sweep.scorers:  # the SimCSE control: its own loss's Taylor score, label-free
            simcse = compute_infonce_scores(enc, simcse_sentences(cfg, data_dir), batch_size=cfg.score.batch_size,
                                            temperature=cfg.train.temperature, seed=cfg.score.seed,
                                            max_len=cfg.train.max_len, pooler=cfg.model.pooler)
            store.write_bytes(out.replace("scores", "scores_simcse", 1), scores_to_bytes(simcse))
    sc.meta["overlap"] = test_overlap(cfg, data_dir, pairs)
    if cfg.sweep.select_on == "clean-dev":
        sc.meta["selection"] = clean_counts(data_dir)
    store.write_bytes(out, scores_to_bytes(sc))  # last: its presence means scoring finished
    return sc.meta


def test_overlap(cfg, data_dir: Path, pairs) -> list[dict] | None:
    """data.overlap_counts of the sweep's STS test tasks against the dev data that selects (sweep.select_on) and
    the scoring pairs; None when a file it needs is not here."""
    try:
        return overlap_counts(data_dir, sts_tasks(cfg.eval.tasks), selection_all(data_dir, cfg.sweep.select_on),
                              None if cfg.score.source == "unlabeled" else pairs)
    except SparseCSEError:
        return None


def load_simcse_scores(store: Storage, cfg, replicate: int = 0):
    """The SimCSE control's scores (of a stage-1 replicate) when the sweep asks for that scorer, else None."""
    if "simcse" not in cfg.sweep.scorers:
        return None
    rel = replicate_name("scores_simcse.parquet", replicate)
    return load_scores(store.read_bytes(rel), name=store.url(rel))


# --------------------------------------------------------------------------- stage 3: one Tune trial

def trial(point: Point, *, store_uri: str, data_dir: str, cfg_dict: dict, scores, simcse_scores=None,
          report: Report, restored: Restored = lambda local: None) -> None:
    """One (scorer, sparsity, λ, seed): masks from the shared scores (or a control scorer), rewind, retrain with the
    mask fixed, evaluate the best dev checkpoint on the STS test sets. Every evaluation is reported (`report`),
    with a checkpoint when train.checkpoint_every falls due and at the end (checkpoints.py); the last report
    carries the test figures and what checkpointing cost; a restarted trial continues from `restored`. Nothing stays on the node: checkpoints go wherever `report` puts them, predictions to storage."""
    t0 = time.perf_counter()
    name = point.name
    node = on_node(store_uri, cfg_dict, data_dir, cfg_dict["sweep"]["trial_cpus"])
    store, data_dir = node.store, node.data_dir
    cfg = node.cfg.replace(train=type(node.cfg.train)(**{**node.cfg.to_dict()["train"], "seed": point.run_seed}))
    if isinstance(scores, (list, tuple)):  # sweep.replicates: each replicate's trials use its own scores
        scores, simcse_scores = scores[point.replicate], simcse_scores and simcse_scores[point.replicate]
    pre = load_encoder(cfg.model.name, pooler=cfg.model.pooler, dropout=cfg.train.dropout)
    hm, nm = masks_for(point.scorer, point.sparsity, point.lam, point.run_seed, scores=scores, pretrained=pre,
                       simcse_scores=simcse_scores, combine=point.combine, normalize=point.normalize)
    pre.set_masks(hm, nm)
    # every report carries the point and the model's size: the second objective of sweep.objective=pareto
    base = {**point.params(), "trial": name, EVALUATED: False, PARAMS: encoder_params(pre)}
    meta = {**point.params(), "pretrained": cfg.model.name,
            "scores": store.url(replicate_name("scores.parquet", point.replicate)),
            "scores_fingerprint": scores.meta["model_fingerprint"]}
    device = task_device(cfg.sweep.trial_gpus)
    with scratch_dir("trial") as tmp:
        # TensorBoard reaches storage at every evaluation, before Tune hears of it: a trial a scheduler stops
        # there keeps its curves
        tb = tmp / "tensorboard" if "tensorboard" in cfg.sweep.loggers else None
        persist = Persist(store, f"trials/{name}", lambda rec, ckpt: report({**base, **rec}, ckpt))
        callbacks = [*installed_callbacks(name, 0, store), *([TensorBoardSync(store, tb, name)] if tb else []),
                     OnReport(persist)]
        resume = persist.restore(restored(tmp / "resume"))
        res = train_simcse(cfg, tmp / "out", data_dir, init=None if resume else rewind(pre, hm, nm),
                           callbacks=callbacks, resume_dir=resume, tb_dir=tb, progress=False, meta=meta,
                           dist=Dist(device=device))
        best = load_encoder(str(tmp / "out" / "best"), pooler=cfg.model.eval_pooler).to(device)
        final = evaluate_trial(best, cfg, data_dir, store, name)
    # no checkpoint here: the last training report already carries the final state (its best model's pointer),
    # so the trial's result checkpoint is that one and nothing is uploaded twice
    report({**base, EVALUATED: True, "step": res.steps, LAST_DEV: res.best_dev, DEV: res.best_dev,
            "sentences_per_s": res.sentences_per_s, "trial_s": time.perf_counter() - t0, **persist.stats.metrics(),
            "gpu_peak_gib": gpu_peak_gib(device), **final}, None)


def selection_needs_dev_pairs(cfg) -> bool:
    """A tested selection rule with one unit (one seed, one replicate) tests on the dev pairs themselves: each trial
    then keeps its best model's per-pair dev predictions (predictions/<trial>.dev.parquet)."""
    return cfg.sweep.select != "best_dev" and len(cfg.sweep.seeds) == 1 and cfg.sweep.replicates == 1


def evaluates_choice(cfg) -> bool:
    """Whether each trial scores its best model on the choice pairs (metric_key("choice", …) and
    predictions/<trial>.choice.parquet): with the clean selection data, whose choice half no checkpoint saw, and
    for the "safe" rule, which tests each source of the choice data."""
    return cfg.sweep.select_on == "clean-dev" or cfg.sweep.select == "safe"


def choice_predictions(best, cfg, data_dir: Path) -> dict:
    """{source: (cosine per pair, gold)} of the model on the pairs the sweep chooses on: per source of the clean
    selection data's choice half (sweep.select_on: clean-dev), else the whole sweep.select_on set as one source."""
    pairs = selection_pairs(data_dir, cfg.sweep.select_on, part="choice")
    emb = encode(best, pairs.s1 + pairs.s2, batch_size=cfg.eval.batch_size, pooler=cfg.model.eval_pooler)
    cos, gold = cosine_scores(emb, pairs), np.asarray(pairs.gold, dtype=np.float64)
    if pairs.source is None:
        return {cfg.sweep.select_on: (cos, gold)}
    src = np.array(pairs.source)
    return {name: (cos[src == name], gold[src == name]) for name in dict.fromkeys(pairs.source)}


def choice_metrics(preds: dict) -> dict:
    """choice/<source> and choice/all (every source's pairs together): Spearman × 100."""
    out = {metric_key("choice", k): 100.0 * spearman(p, g) for k, (p, g) in preds.items()}
    allp, allg = (np.concatenate([v[i] for v in preds.values()]) for i in (0, 1))
    out[metric_key("choice", "all")] = 100.0 * spearman(allp, allg)
    return out


def dev_predictions(best, cfg, data_dir: Path) -> dict:
    """{"dev": (cosine per pair, gold)} of the model on the dev pairs its checkpoint was chosen on (the same
    train.eval_max_pairs subsample of sweep.select_on, so their Spearman is the trial's best dev score)."""
    pairs = dev_pairs(data_dir, cfg.train.eval_max_pairs, select_on=cfg.sweep.select_on)
    emb = encode(best, pairs.s1 + pairs.s2, batch_size=cfg.eval.batch_size, pooler=cfg.model.eval_pooler)
    return {"dev": (cosine_scores(emb, pairs), np.asarray(pairs.gold, dtype=np.float64))}


def evaluate_trial(best, cfg, data_dir: Path, store: Storage, name: str) -> dict:
    """A trial's final metrics from its best dev model: test/<STS task>, align, uniform, and transfer/<task> when
    eval.transfer is "all" (every trial, so the report's best-per-task transfer row exists). Its per-pair test predictions
    go to storage: what the report's bootstrap over test pairs resamples for single-seed claims."""
    preds: dict = {}
    table = evaluate_sts(best, data_dir, tasks=sts_tasks(cfg.eval.tasks), batch_size=cfg.eval.batch_size,
                         pooler=cfg.model.eval_pooler, alignment_uniformity=True, predictions=preds)
    store.write_bytes(f"predictions/{name}.parquet", predictions_to_bytes(preds))
    if selection_needs_dev_pairs(cfg):
        store.write_bytes(f"predictions/{name}.dev.parquet", predictions_to_bytes(dev_predictions(best, cfg, data_dir)))
    out = {k: table.pop(k) for k in ("align", "uniform")}
    if evaluates_choice(cfg):
        choice = choice_predictions(best, cfg, data_dir)
        store.write_bytes(f"predictions/{name}.choice.parquet", predictions_to_bytes(choice))
        out.update(choice_metrics(choice))
    out.update({metric_key("test", k): v for k, v in table.items()})
    if cfg.eval.transfer == "all":
        out.update({metric_key("transfer", k): v for k, v in evaluate_transfer(
            best, data_dir, pooler=cfg.model.eval_pooler, classifier=cfg.eval.transfer_classifier).items()})
    return out


# --------------------------------------------------------------------------- evaluation and export tasks

def evaluate_task(store_uri: str, model_rel: str | None, data_dir: str, cfg_dict: dict, *, sts: bool, transfer: bool,
                  threads: float, gpus: float, pooler: str | None = None) -> dict:
    """{"sts": {task: Spearman ×100, avg, align, uniform}, "transfer": {task: accuracy}} of a model in the run
    (`pooler`: another than model.eval_pooler, e.g. the pre-trained model's own)."""
    node = on_node(store_uri, cfg_dict, data_dir, threads)
    cfg, store, data_dir = node.cfg, node.store, node.data_dir
    pooler = pooler or cfg.model.eval_pooler
    out: dict = {}
    with scratch_dir("eval") as tmp:
        # model_rel None: the pre-trained backbone itself (cfg.model.name), for reference
        src = cfg.model.name if model_rel is None else str(fetch_model(store, model_rel, tmp))
        enc = load_encoder(src, pooler=pooler)
        enc = enc.to(task_device(gpus))
        if sts:
            out["sts"] = evaluate_sts(enc, data_dir, tasks=sts_tasks(cfg.eval.tasks),
                                      batch_size=cfg.eval.batch_size, pooler=pooler,
                                      alignment_uniformity=True)
        if transfer:
            out["transfer"] = evaluate_transfer(enc, data_dir, pooler=pooler,
                                                classifier=cfg.eval.transfer_classifier)
    return out


def pilot_task(store_uri: str, model_rel: str, data_dir: str, cfg_dict: dict, threads: float, gpus: float) -> list[dict]:
    """The pilot study on the stage-1 model: each scorer's masks at every sparsity, no retraining, STS test."""
    node = on_node(store_uri, cfg_dict, data_dir, threads)
    cfg, store, data_dir = node.cfg, node.store, node.data_dir
    scores = load_scores(store.read_bytes("scores.parquet"), name=store.url("scores.parquet"))
    with scratch_dir("pilot") as tmp:
        enc = load_encoder(str(fetch_model(store, model_rel, tmp)), pooler=cfg.model.eval_pooler).to(task_device(gpus))
        return pilot(enc.eval(), scores, data_dir, sparsities_with_zero(cfg.sweep.sparsities), lam=pilot_lam(cfg),
                     scorers=cfg.sweep.scorers, readings=cfg.score.allocations,
                     simcse_scores=load_simcse_scores(store, cfg),
                     sts={"tasks": sts_tasks(cfg.eval.tasks), "batch_size": cfg.eval.batch_size,
                          "pooler": cfg.model.eval_pooler})


def pilot_lam(cfg) -> float:
    """The λ the pilot prunes with: sweep.select_lam, else 0.5 when in the grid (the paper's), else the first."""
    if cfg.sweep.select_lam is not None:
        return cfg.sweep.select_lam
    return 0.5 if 0.5 in cfg.sweep.lams else cfg.sweep.lams[0]


def export_task(store_uri: str, model_rel: str, cfg_dict: dict, results: dict | None, threads: float,
                data_dir: str | None = None) -> str:
    """The model at `model_rel` exported (dense + pruned/, model card; pruned/onnx/ with sweep.export_onnx) to the
    run's export/, its speed measured on `data_dir`'s wiki sentences; returns its URL."""
    node = on_node(store_uri, cfg_dict, data_dir, threads)
    cfg, store = node.cfg, node.store
    with scratch_dir("export") as tmp:
        out = export_model(str(fetch_model(store, model_rel, tmp)), tmp / "export", pooler=cfg.model.eval_pooler,
                           results=results, onnx=cfg.sweep.export_onnx, data_dir=node.data_dir)
        store.upload_dir(out, "export")
    return store.url("export")


# --------------------------------------------------------------------------- preflight on every node

def check_node(store_uri: str, marker_rel: str | None, data_dir: str, paths: list[str], model: str) -> list[str]:
    """What this node cannot reach of the run (empty list: all fine). Runs pinned to each node before stage 1."""
    problems = []
    try:
        store = Storage(store_uri)
        if marker_rel is not None and not store.exists(marker_rel):
            problems.append(f"cannot see --out {store.uri} (the driver's local disk is not shared with this node); "
                            "use an s3://, gs:// or abfs:// URI or a path mounted on every node (NFS)")
    except SparseCSEError as e:
        problems.append(str(e))
    try:  # a staged data dir or model (a URI) is fetched to this node and verified here, once
        data = local_data(data_dir)
        if is_staged_uri(model):
            local_data(model)
    except SparseCSEError as e:
        return [*problems, str(e)]
    missing = [p for p in paths if not (data / p).exists()]
    if missing:
        problems.append(f"cannot read {data / missing[0]} ({len(missing)} of the data paths missing); "
                        "mount the data at the same --data-dir on every node, run `sparsecse data fetch` there, or "
                        "stage it once (`sparsecse data stage`)")
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():  # a local model directory
        problems.append(f"cannot read model.name {model} (not a directory on this node); put it on every node")
    return problems
