"""`sparsecse sweep`: the whole SparseCSE study on Ray (train once, score once, Tune over sparsity × λ × seed,
select on STS-B dev, report, export). Ray calls live in ray_adapter; this module is the pipeline.

Run directory layout:
    config.yaml, sweep.json        resolved config; stage fingerprints (resume)
    simcse/best                    stage-1 SimCSE model (selected on STS-B dev)
    scores.parquet                 stage-2 alignment/uniformity gradients
    tune/                          Ray Tune experiment (trial checkpoints, Tune state)
    trials/<name>/                 each trial's outputs; tensorboard/<name>/ its TensorBoard logs
    results.{parquet,json}, report.{md,html}, figures/*.png, export/
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

from . import SparseCSEError
from .config import STS_TASKS, Config, config_from_dict, load_config
from .io import atomic_write_json, atomic_write_text, verify_manifest

SWEEP_FILE = "sweep.json"


def _fp(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def grid_points(cfg: Config) -> list[dict]:
    """sparsity × λ × seed; sparsity 0 (the rewound SimCSE control) ignores λ, so it runs once per seed."""
    pts = []
    for seed in cfg.sweep.seeds:
        for s in cfg.sweep.sparsities:
            for lam in (cfg.sweep.lams[:1] if s == 0 else cfg.sweep.lams):
                pts.append({"sparsity": float(s), "lam": float(lam), "seed": int(seed)})
    return pts


def point_name(p: dict) -> str:
    return f"s{p['sparsity']:.3f}_l{p['lam']:.2f}_seed{p['seed']}"


def preflight(cfg: Config, address: str | None) -> None:
    """Config errors that need no Ray: resources on a local machine."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    ncpu = cfg.ray.num_cpus or os.cpu_count() or 1
    if (cfg.ray.use_gpu or cfg.sweep.trial_gpus > 0) and not torch.cuda.is_available():
        key = "ray.use_gpu" if cfg.ray.use_gpu else "sweep.trial_gpus"
        raise SparseCSEError(f"config {key}: asks for a GPU but none is available here; set {key}="
                             f"{'false' if cfg.ray.use_gpu else '0'} or run on a GPU machine/cluster")
    if cfg.ray.num_workers * cfg.ray.cpus_per_worker > ncpu:
        raise SparseCSEError(f"config ray.num_workers: {cfg.ray.num_workers} workers × {cfg.ray.cpus_per_worker} CPU "
                             f"need more than the {ncpu} CPUs here; lower ray.num_workers or ray.cpus_per_worker")
    if cfg.sweep.trial_cpus > ncpu:
        raise SparseCSEError(f"config sweep.trial_cpus: {cfg.sweep.trial_cpus} exceeds the {ncpu} CPUs here")
    if cfg.train.batch_size % cfg.ray.num_workers:
        raise SparseCSEError(f"config train.batch_size: {cfg.train.batch_size} is not divisible by "
                             f"ray.num_workers={cfg.ray.num_workers}")


def _faults() -> dict[str, str]:
    """Fault injection for the reliability tests: SPARSECSE_FAULT="kind:arg,..." with kinds
    stage1-kill:STEP (SIGKILL the rank-0 Ray Train worker once, after the checkpoint at STEP),
    trial-exit:TRIAL (the trial process dies once mid-trial), trial-nan:TRIAL (that trial's loss diverges)."""
    out = {}
    for spec in filter(None, os.environ.get("SPARSECSE_FAULT", "").split(",")):
        kind, _, arg = spec.partition(":")
        out[kind] = arg
    return out


def _fire_once(marker: Path) -> bool:
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("fired\n")
    return True


def _threads(n: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


def task_device(gpus: float) -> str:
    """Where a scoring task or trial computes: the GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- stage 1: Ray Train worker loop

def stage1_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: SimCSE with the global batch split across workers."""
    from . import ray_adapter as ra
    from .config import config_from_dict
    from .train import Dist, train_simcse

    cfg = config_from_dict(loop_config["config"])
    rank, world = ra.train_context()
    _threads(loop_config["cpus_per_worker"])
    resume = ra.train_checkpoint_dir()
    out = Path(loop_config["work_dir"]) / f"rank{rank}"
    kill_at = _faults().get("stage1-kill")
    report = ra.train_report
    if kill_at and rank == 0:
        def report(metrics, ckpt):
            # die mid-training: at the first report after step `kill_at`, before reporting it, so the
            # checkpoint at `kill_at` is the latest one Ray knows
            if metrics["step"] > int(kill_at) and _fire_once(Path(loop_config["work_dir"]).parent / ".fault-stage1-killed"):
                time.sleep(5)  # Ray Train's controller registers reports by polling: let it see the last one
                os.kill(os.getpid(), signal.SIGKILL)
            ra.train_report(metrics, ckpt)
    train_simcse(cfg, out, Path(loop_config["data_dir"]), dist=Dist(rank, world), device=ra.train_device(),
                 wrap=ra.prepare_ddp if world > 1 else None, report=report, resume_dir=resume,
                 tb_dir=Path(loop_config["tb_dir"]) if rank == 0 else None, progress=False)


# --------------------------------------------------------------------------- stage 2: scoring task

def score_task(model_dir: str, data_dir: str, cfg_dict: dict, out_path: str, threads: float, gpus: float = 0) -> dict:
    from .config import config_from_dict
    from .data import load_stsb
    from .model import load_encoder
    from .score import compute_scores, save_scores

    _threads(threads)
    cfg = config_from_dict(cfg_dict)
    enc = load_encoder(model_dir).to(task_device(gpus))
    pairs = load_stsb(Path(data_dir), cfg.score.split)
    sc = compute_scores(enc, pairs, batch_size=cfg.score.batch_size, threshold=cfg.score.positive_threshold,
                        seed=cfg.score.seed, max_pairs=cfg.score.max_pairs, pooler=cfg.model.eval_pooler,
                        max_len=cfg.train.max_len)
    save_scores(sc, out_path)
    return sc.meta


# --------------------------------------------------------------------------- stage 3: one Tune trial

def make_trial(run_dir: str, data_dir: str, cfg_dict: dict):
    def trial(config: dict) -> None:
        from . import ray_adapter as ra
        from .config import config_from_dict
        from .evaluate import evaluate_sts
        from .model import load_encoder
        from .prune import rewind, select_masks
        from .score import load_scores
        from .train import train_simcse

        p = config["point"]
        cfg = config_from_dict(cfg_dict)
        cfg = cfg.replace(train=type(cfg.train)(**{**cfg.to_dict()["train"], "seed": p["seed"]}))
        _threads(cfg.sweep.trial_cpus)
        run = Path(run_dir)
        name = point_name(p)
        out = run / "trials" / name
        faults = _faults()
        if faults.get("trial-nan") == name:
            cfg = cfg.replace(train=type(cfg.train)(**{**cfg.to_dict()["train"], "lr": 1e30}))
        scores = load_scores(run / "scores.parquet")
        head, neuron = scores.importance(p["lam"])
        hm, nm = select_masks(head, neuron, p["sparsity"])
        resume = ra.tune_checkpoint_dir()
        init = None if resume else rewind(cfg.model.name, hm, nm, pooler=cfg.model.pooler, dropout=cfg.train.dropout)
        meta = {"sparsity": p["sparsity"], "lam": p["lam"], "seed": p["seed"], "pretrained": cfg.model.name,
                "scores": str(run / "scores.parquet"), "scores_fingerprint": scores.meta["model_fingerprint"]}
        base = {"sparsity": p["sparsity"], "lam": p["lam"], "seed": p["seed"], "trial": name, "done": False,
                "node_id": ra.node_id()}

        def report(rec: dict, ckpt):
            if faults.get("trial-exit") == name and _fire_once(out / ".fault-fired"):
                os.kill(os.getpid(), signal.SIGKILL)  # the trial process is killed mid-trial
            ra.tune_report({**base, **rec}, ckpt)

        device = task_device(cfg.sweep.trial_gpus)
        res = train_simcse(cfg, out, Path(data_dir), init=init, head_mask=hm, neuron_mask=nm, report=report,
                           resume_dir=resume, tb_dir=run / "tensorboard" / name, progress=False, meta=meta,
                           device=device)
        best = load_encoder(str(out / "best"), pooler=cfg.model.eval_pooler).to(device)
        sts_tasks = tuple(t for t in cfg.eval.tasks if t in STS_TASKS)
        table = evaluate_sts(best, Path(data_dir), tasks=sts_tasks, batch_size=cfg.eval.batch_size,
                             pooler=cfg.model.eval_pooler, alignment_uniformity=True)
        au = {k: table.pop(k) for k in ("align", "uniform")}
        final = {**base, "done": True, "step": res.steps, "stsb_dev": res.best_dev, "best_stsb_dev": res.best_dev,
                 "sentences_per_s": res.sentences_per_s, **{f"test/{k}": v for k, v in table.items()}, **au}
        ra.tune_report(final, out / "latest")

    return trial


# --------------------------------------------------------------------------- driver

def _load_state(run: Path) -> dict:
    p = run / SWEEP_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def _save_state(run: Path, state: dict) -> None:
    atomic_write_json(run / SWEEP_FILE, state)


def _stage1_fp(cd: dict) -> str:
    return _fp({k: cd[k] for k in ("model", "data", "train")})


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
        if state.get("train_fp") == _stage1_fp(saved):
            state["train_fp"] = _stage1_fp(upgraded)
        state["config"] = upgraded
    return True


def run_sweep(config_path: str, overrides=None, resume: bool = False, address: str | None = None,
              out: str | None = None, data_dir: str | None = None) -> dict:
    from .data import resolve_data_dir

    cfg = load_config(config_path, overrides)
    data = resolve_data_dir(data_dir or cfg.data.dir)
    run = Path(out or Path("runs") / Path(config_path).stem).resolve()
    state = _load_state(run)
    if resume and not state:
        raise SparseCSEError(f"--resume: {run} holds no sweep ({SWEEP_FILE} missing); drop --resume to start one")
    if not resume and run.exists() and any(run.iterdir()):
        what = "a sweep" if state else "something else"
        raise SparseCSEError(f"--out {run}: already holds {what}; pass --resume to continue it or choose another --out")
    if resume and state.get("config") and not upgrade_state(state, cfg):
        raise SparseCSEError(f"--resume: {run} was started with a different config; use the same YAML and --set "
                             "values, or start a new sweep with another --out")
    preflight(cfg, address)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", cfg.to_yaml())
    state.setdefault("config", cfg.to_dict())
    state.setdefault("stage_runs", {"train": 0, "score": 0})
    _save_state(run, state)

    from . import ray_adapter as ra
    from .report import write_report

    t_start = time.perf_counter()
    ra.connect(address, cfg.ray.num_cpus, dashboard=os.environ.get("SPARSECSE_DASHBOARD", "1") != "0")
    timings = state.setdefault("timings", {})
    try:
        res = ra.cluster_resources()
        if (cfg.ray.use_gpu or cfg.sweep.trial_gpus > 0) and res.get("GPU", 0) <= 0:
            raise SparseCSEError("config ray.use_gpu/sweep.trial_gpus: asks for GPUs but the Ray cluster has none")

        # ---- stage 1: train once
        cd = cfg.to_dict()
        fp1 = _stage1_fp(cd)
        simcse = run / "simcse" / "best"
        if state.get("train_fp") == fp1 and (simcse / "manifest.json").exists():
            verify_manifest(simcse)
            print(f"[sweep] stage 1 skipped (trained model {simcse} matches)")
        else:
            t0 = time.perf_counter()
            shutil.rmtree(run / "simcse", ignore_errors=True)
            ckpt = ra.run_torch_trainer(stage1_loop, {"config": cd, "data_dir": str(data), "work_dir": str(run / "stage1-work"),
                                                      "tb_dir": str(run / "tensorboard" / "simcse"),
                                                      "cpus_per_worker": cfg.ray.cpus_per_worker},
                                        num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                        cpus_per_worker=cfg.ray.cpus_per_worker, storage=run, name="stage1",
                                        max_failures=cfg.ray.max_failures)
            if not (ckpt / "best").is_dir():
                raise SparseCSEError(f"stage-1 checkpoint {ckpt} has no best model")
            verify_manifest(ckpt / "best")
            tmp = run / "simcse.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ckpt / "best", tmp / "best")
            shutil.copyfile(ckpt / "history.json", tmp / "history.json")  # dev curve + where it resumed after faults
            os.replace(tmp, run / "simcse")
            shutil.rmtree(run / "stage1-work", ignore_errors=True)
            state["train_fp"] = fp1
            state["stage_runs"]["train"] += 1
            timings["train_s"] = time.perf_counter() - t0
            state.pop("score_fp", None)
            _save_state(run, state)

        # ---- stage 2: score once
        from .model import load_encoder, weights_fingerprint

        model_fp = weights_fingerprint(load_encoder(str(simcse)))
        fp2 = _fp({"model": model_fp, "score": cd["score"], "eval_pooler": cfg.model.eval_pooler})
        scores_path = run / "scores.parquet"
        if state.get("score_fp") == fp2 and scores_path.exists():
            from .score import load_scores

            load_scores(scores_path, expect_fingerprint=model_fp)
            print(f"[sweep] stage 2 skipped ({scores_path} matches the trained model)")
        else:
            t0 = time.perf_counter()
            ra.run_task(score_task, str(simcse), str(data), cd, str(scores_path), cfg.sweep.trial_cpus,
                        cfg.sweep.trial_gpus, num_cpus=cfg.sweep.trial_cpus, num_gpus=cfg.sweep.trial_gpus)
            state["score_fp"] = fp2
            state["stage_runs"]["score"] += 1
            timings["score_s"] = time.perf_counter() - t0
            _save_state(run, state)

        # ---- stage 3: Tune trials
        t0 = time.perf_counter()
        points = grid_points(cfg)
        grid = ra.run_tuner(make_trial(str(run), str(data), cd), points, storage=run, name="tune",
                            cpus=cfg.sweep.trial_cpus, gpus=cfg.sweep.trial_gpus,
                            max_concurrent=cfg.sweep.max_concurrent_trials, max_failures=cfg.sweep.max_failures,
                            scheduler=cfg.sweep.scheduler, resume=resume)
        timings["tune_s"] = time.perf_counter() - t0
        rows = ra.grid_rows(grid)

        # ---- stage 4–6: select, report, export
        t0 = time.perf_counter()
        summary = write_report(run, cfg, rows, simcse, data)
        timings["report_s"] = time.perf_counter() - t0
        if cfg.sweep.export_best and summary.get("selected"):
            from .export import export_model

            sel = summary["selected"]
            export_model(str(Path(sel["trial_dir"]) / "best"), run / "export", pooler=cfg.model.eval_pooler,
                         results=sel.get("test"))
            summary["export"] = str(run / "export")
        timings["total_s"] = time.perf_counter() - t_start
        state["summary"] = summary
        _save_state(run, state)
        atomic_write_json(run / "summary.json", {**summary, "timings": timings, "stage_runs": state["stage_runs"]})
        print(f"[sweep] done: {run / 'report.md'}")
        if summary.get("selected"):
            s = summary["selected"]
            print(f"[sweep] selected sparsity={s['sparsity']} λ={s['lam']} (STS-B dev {s['dev_mean']:.2f})")
        return summary
    finally:
        if not (address or os.environ.get("RAY_ADDRESS")):
            ra.shutdown()
