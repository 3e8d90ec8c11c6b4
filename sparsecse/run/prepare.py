"""Stages 1 and 2 on the cluster, once per stage-1 replicate: Ray Train's SimCSE run (its best dev model becomes
simcse/best) and the importance scores (scores.parquet), each skipped when its fingerprint says its output is
already this config's, and resumed from its last checkpoint when the driver was interrupted."""

from __future__ import annotations

import json
import threading
import time
from typing import Callable

from .. import SparseCSEError
from ..core.checkpoints import MODELS, best_model
from ..core.config import Config
from ..core.results import DEV, LAST_DEV, replicate_name
from ..method.score import load_scores
from .rundir import TRIAL_EXPERIMENTS, Run, fingerprint, replicate_config, stage1_fingerprint
from . import ray_adapter as ra
from . import stages


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
    run's window is kept in the timings). train_s adds up the time of every replicate trained, by whichever driver:
    a resumed run that skips stage 1 keeps what it cost."""
    reps = run.cfg.sweep.replicates
    slots = min(reps, stage1_slots(run.cfg, ra.cluster_resources())) if reps > 1 else 1
    if slots == 1:
        for r in range(reps):
            _train_replicate(run, r)
        return
    print(f"[sweep] stage 1: {reps} replicates, {slots} at a time")
    in_slots([lambda r=r: _train_replicate(run, r) for r in range(reps)], slots)


def in_slots(jobs: list[Callable[[], None]], slots: int, poll_s: float = 0.2) -> None:
    """Run `jobs`, `slots` at a time, each on a daemon thread, waited for here. After a failure no further job
    starts and the first failure (in job order) is raised once the running ones end. Ctrl-C in this (the main)
    thread starts nothing more and returns at once: the daemon threads end with the interrupted process (a
    thread pool would keep the process alive until every submitted job had run)."""
    pending, running, errors = list(enumerate(jobs)), {}, {}

    def start(i: int, job: Callable[[], None]) -> None:
        def target() -> None:
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - raised in the waiting thread
                errors[i] = e

        running[i] = threading.Thread(target=target, name=f"stage1-{i}", daemon=True)
        running[i].start()

    while pending or running:
        while pending and len(running) < slots and not errors:
            start(*pending.pop(0))
        if errors and not running:
            break
        for i, t in list(running.items()):
            t.join(poll_s)
            if not t.is_alive():
                del running[i]
    if errors:
        raise errors[min(errors)]


def _train_replicate(run: Run, r: int) -> None:
    cfg, st, store = replicate_config(run.cfg, r), run.state, run.store
    simcse, stage1 = replicate_name("simcse", r), replicate_name("stage1", r)
    fp1 = stage1_fingerprint(cfg.to_dict())
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
    print(f"[sweep] stage 1{f' (replicate {r})' if r else ''}: SimCSE on {cfg.ray.num_workers} worker(s)…", flush=True)
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
    best = max((h.get(DEV, h.get(LAST_DEV)) for h in json.loads(history)["history"]), default=None)
    print(f"[sweep] stage 1{f' (replicate {r})' if r else ''} done in {time.perf_counter() - t0:.0f} s"
          + (f": best dev {best:.2f}" if isinstance(best, (int, float)) else ""), flush=True)
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
    model_fp = fingerprint(store.read_json(f"{model}/manifest.json"))  # identifies the weights without loading them
    reads = {k: v for k, v in cfg.to_dict()["score"].items() if k not in ("combine", "normalize")}  # not in the file
    fp2 = fingerprint({"model": model_fp, "score": reads, "eval_pooler": cfg.model.eval_pooler, "max_len": cfg.train.max_len,
               "train_file": cfg.data.train_file if cfg.score.source == "unlabeled" else None})
    if st.fp(r, "score_fp") == fp2 and store.is_file(rel):
        print(f"[sweep] stage 2 skipped ({store.url(rel)} matches the trained model)")
        return False
    t0 = time.perf_counter()
    print(f"[sweep] scoring every head and neuron{f' (replicate {r})' if r else ''}…", flush=True)
    ra.run_tasks([("scoring", stages.score_task, (store.uri, model, run.data_dir, cfg.to_dict(),
                                                  cfg.sweep.trial_cpus, cfg.sweep.trial_gpus, rel), {},
                   cfg.sweep.trial_cpus, cfg.sweep.trial_gpus)])
    st.set_fp(r, "score_fp", fp2)
    st.stage_runs["score"] += 1
    st.timings["score_s"] = st.timings.get("score_s", 0.0) + time.perf_counter() - t0
    run.save()
    return True
