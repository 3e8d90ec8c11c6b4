"""Ray: the end-to-end sweep on the tiny model, resume, a stage-1 worker killed and a crashed trial retried. Slow
(tens of seconds each); more sweeps (controls, ASHA, Optuna, replicates, the default selection) are in
tests/test_ray_search.py, the two-node cluster in tests/test_cluster.py."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_processes_mentioning

from sparsecse.core.checkpoints import best_model
from sparsecse.core.storage import Storage


pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


# The Ray-machinery sweeps below pin the selection protocol they were written under (STS-B dev, `noninferior`, one
# control run): what they test is the run, not the choice; test_the_default_selection_… runs the defaults end to end.
SWEEP_TIMEOUT_S = 600  # a tiny sweep takes 1–3 min on 2 cores, CI's other worker busy beside it
_SWEEPS = itertools.count()
PINNED = "select: noninferior, select_on: stsb-dev, control_seeds: 0,"


def _write_cfg(path: Path, model_dir: Path, sparsities=(0.1, 0.3), lams=(0.25, 0.75), extra: str = "",
               pinned: str = PINNED) -> Path:
    path.write_text(f"""
model: {{name: {model_dir}}}
data: {{max_train_sentences: 64}}
train: {{batch_size: 8, max_len: 16, lr: 1.0e-3, max_steps: 4, eval_steps: 2, eval_max_pairs: 40,
        checkpoint_every: 1}}
score: {{max_pairs: 24, batch_size: 8}}
eval: {{tasks: [STSBenchmark, SICKRelatedness], batch_size: 64}}
sweep: {{sparsities: {list(sparsities)}, lams: {list(lams)}, seeds: [1], trial_cpus: 1, max_concurrent_trials: 2,
         {pinned} max_failures: 1}}
ray: {{num_workers: 1, cpus_per_worker: 1, num_cpus: 2}}
{extra}
""")
    return path


def _sweep(cfg: Path, out: Path, data: Path, *extra, env=None, scrape: int | None = None):
    """`sparsecse sweep` in a subprocess on a fresh local Ray; faults (tests/faults.py) fire as `env` says.
    `scrape`: every 2 s while it runs, the Prometheus endpoint at that port is read; the lines of sparsecse's own
    metrics seen are returned as the result's `.metrics`."""
    e = {**os.environ, "SPARSECSE_DASHBOARD": "0", "RAY_ADDRESS": "", **(env or {})}
    e.pop("RAY_ADDRESS")
    if "SPARSECSE_FAULT" in e:
        import faults

        e.update(faults.env(e["SPARSECSE_FAULT"], e))
    argv = [sys.executable, "-m", "sparsecse", "sweep", str(cfg), "--out", str(out), "--data-dir", str(data), *extra]
    ray_tmp = Path("/tmp") / f"scse-{os.getpid()}-{next(_SWEEPS)}"  # its local Ray's files: killed with it if it hangs
    e["RAY_TMPDIR"] = str(ray_tmp)
    try:
        if scrape is None:
            return subprocess.run(argv, capture_output=True, text=True, env=e, timeout=SWEEP_TIMEOUT_S)
        return _scraped(argv, e, scrape)
    except subprocess.TimeoutExpired as t:
        pytest.fail(f"`sparsecse sweep` did not finish within {SWEEP_TIMEOUT_S} s; its output ends:\n"
                    f"{(t.stdout or '')[-4000:]}\n{(t.stderr or '')[-4000:]}", pytrace=False)
    finally:
        kill_processes_mentioning(str(ray_tmp))  # a hung sweep's Ray would slow every later test down
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _scraped(argv: list[str], e: dict, scrape: int) -> subprocess.CompletedProcess:
    """The sweep run while its Prometheus endpoint is read every 2 s (see _sweep)."""
    import threading
    import urllib.request

    seen: set[str] = set()
    done = threading.Event()

    def read_metrics() -> None:
        while not done.is_set():
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{scrape}/metrics", timeout=5).read().decode()
                seen.update(x for x in text.splitlines() if x.startswith("ray_sparsecse_"))
            except OSError:  # Ray not up yet, or gone
                pass
            done.wait(2)

    reader = threading.Thread(target=read_metrics, daemon=True)
    reader.start()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=SWEEP_TIMEOUT_S)
    finally:
        done.set()
        reader.join()
    r.metrics = sorted(seen)
    return r


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    from conftest import free_port

    d = tmp_path_factory.mktemp("sweep")
    cfg = _write_cfg(d / "tiny.yaml", tiny_model_dir)
    port = free_port()  # the local Ray's Prometheus endpoint, scraped while the sweep runs
    cfg.write_text(cfg.read_text().replace("num_cpus: 2}", f"num_cpus: 2, metrics_export_port: {port}}}"))
    # two faults: the rank-0 stage-1 worker is SIGKILLed after its step-2 checkpoint, a trial process exits mid-run
    r = _sweep(cfg, d / "run", tiny_data_dir, env={"SPARSECSE_FAULT": "stage1-kill:2,trial-exit:s0.300_l0.75_seed1"},
               scrape=port)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return cfg, d / "run", r


def test_sweep_reports_every_point_once_and_selects_the_dev_argmax(finished_sweep):
    _, run, _ = finished_sweep
    res = json.loads((run / "results.json").read_text())
    points = sorted((t["sparsity"], t["lam"]) for t in res["trials"])
    assert points == [(0.1, 0.25), (0.1, 0.75), (0.3, 0.25), (0.3, 0.75)]
    assert all(t["status"] == "done" for t in res["trials"])
    best = max(res["trials"], key=lambda t: t["best_stsb_dev"])
    assert (res["selected"]["sparsity"], res["selected"]["lam"]) == (best["sparsity"], best["lam"])
    assert res["selected"]["test"]["STSBenchmark"] == pytest.approx(best["test/STSBenchmark"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage_runs"] == {"train": 1, "score": 1}
    for f in ("report.md", "report.html", "results.parquet", "figures/sts_avg_vs_sparsity.png",
              "export/pruned/config.json", "export/README.md", "scores.parquet", "simcse/best/manifest.json"):
        assert (run / f).exists(), f
    assert "dev-selected" in (run / "report.md").read_text()
    assert "sweep in progress" not in (run / "report.html").read_text()  # the live page was replaced at the end
    tb = list((run / "tensorboard").rglob("events.out.tfevents*"))
    assert len({p.parent.name for p in tb}) == 5  # stage 1 + four trials
    # the export is the selected trial's best checkpoint, taken from its Tune checkpoint in the run's storage
    sel = res["selected"]
    best_dir = best_model(Storage(str(run)), sel["checkpoint"])
    assert sel["checkpoint"].startswith("tune/") and (run / best_dir / "manifest.json").exists()
    exported = json.loads((run / "export" / "sparsecse.json").read_text())
    assert (exported["sparsity"], exported["lam"]) == (sel["sparsity"], sel["lam"])
    # a checkpoint per evaluation reaches storage (checkpoint_every: 1), one kept per trial, pointing at the one
    # best model of the trial kept beside it; nothing under a trials/ copy
    for t in res["trials"]:
        assert len(list((run / t["checkpoint"]).parent.glob("checkpoint_*"))) == 1, t["trial"]
        assert len(list((run / "models" / "trials" / t["trial"]).glob("*/best-*"))) == 1, t["trial"]
        assert (run / best_model(Storage(str(run)), t["checkpoint"]) / "model.safetensors").is_file()
    assert not (run / "trials").exists() and not (run / "models" / "stage1").exists()
    # while it ran, Ray's Prometheus endpoint served the trials' progress as metrics labelled with their point
    # (a trial's series lives as long as its process: the scrape every 2 s sees those alive at the time)
    import re

    trials = {t["trial"]: t for t in res["trials"]}
    series = [m for m in finished_sweep[2].metrics if m.startswith("ray_sparsecse_trial_")]
    assert series and any(m.startswith("ray_sparsecse_trial_best_stsb_dev{") for m in series), series[:5]
    for m in series:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m))
        t = trials[labels["trial"]]  # every series names a real trial, with its point
        assert (float(labels["sparsity"]), float(labels["lam"]), labels["scorer"]) == (t["sparsity"], t["lam"],
                                                                                       t["scorer"]), m
    assert any(m.startswith("ray_sparsecse_stage1_") for m in finished_sweep[2].metrics)
    # the plan printed before the sweep started, kept beside its results; its wall time within a loose bound of
    # the measured one (this tiny model's sweep is all fixed costs; BENCHMARKS 9 holds the quickstart to ±30 %)
    plan = json.loads((run / "plan.json").read_text())
    timings = json.loads((run / "summary.json").read_text())["timings"]
    total = timings["total_s"]
    assert timings["drivers"] == 1 and timings["elapsed_s"] >= total  # one driver ran it, from its checks on
    assert plan["trials"] == len(res["trials"]) and 1 / 3 < plan["wall_s"] / total < 3, (plan["wall_s"], total)


def test_export_of_a_run_adds_onnx_files_it_lacks(finished_sweep, tmp_path):
    """`sparsecse export RUN --onnx`: the run's export has no ONNX files, so the selected checkpoint is exported
    again here, with them."""
    from sparsecse.cli import main

    _, run, _ = finished_sweep
    assert not (run / "export" / "pruned" / "onnx").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "e"), "--onnx", "--quantize", "none"]) == 0
    assert (tmp_path / "e" / "pruned" / "onnx" / "model.onnx").is_file()
    assert not (tmp_path / "e" / "pruned" / "onnx" / "model_qint8.onnx").exists()
    assert json.loads((tmp_path / "e" / "sparsecse.json").read_text())["sparsity"] == \
        json.loads((run / "results.json").read_text())["selected"]["sparsity"]


def test_stage1_worker_killed_mid_training_resumed_from_its_checkpoint(finished_sweep):
    _, run, _ = finished_sweep
    assert (run / ".faults" / "stage1-killed").exists()  # the rank-0 worker was SIGKILLed mid-training (after step 2)
    hist = json.loads((run / "simcse" / "history.json").read_text())
    assert hist["resumed_at"] == [2]  # ... and the restarted worker group resumed from that checkpoint, not step 0
    assert [h["step"] for h in hist["history"]] == [2, 4]  # the step counter never went backwards
    assert json.loads((run / "summary.json").read_text())["stage_runs"]["train"] == 1  # one stage-1 run, restarted


def test_crashed_trial_was_retried_from_its_checkpoint(finished_sweep):
    _, run, _ = finished_sweep
    assert (run / ".faults" / "trial-exit-s0.300_l0.75_seed1").exists()  # the trial process was SIGKILLed once ...
    res = json.loads((run / "results.json").read_text())
    row = next(t for t in res["trials"] if (t["sparsity"], t["lam"]) == (0.3, 0.75))
    assert row["status"] == "done" and row["steps"] == 4  # ... and was retried to completion


def test_resume_reruns_nothing_finished(finished_sweep, tiny_data_dir):
    cfg, run, _ = finished_sweep
    before = {p: p.stat().st_mtime_ns for p in (run / "models" / "trials").glob("*/*/best-*/model.safetensors")}
    sel_before = json.loads((run / "results.json").read_text())["selected"]
    r = _sweep(cfg, run, tiny_data_dir, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 1 skipped" in r.stdout and "stage 2 skipped" in r.stdout
    after = {p: p.stat().st_mtime_ns for p in (run / "models" / "trials").glob("*/*/best-*/model.safetensors")}
    assert before == after and len(after) == 4  # 4 trials × 1 best model, none rewritten
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage_runs"] == {"train": 1, "score": 1}
    assert json.loads((run / "results.json").read_text())["selected"] == sel_before
    # a second sweep into the same directory without --resume is refused
    r = _sweep(cfg, run, tiny_data_dir)
    assert r.returncode == 2 and "already holds a sweep" in r.stderr
    # scores that no longer match (here: their fingerprint made stale) are recomputed, and the trials that chose
    # their masks from the old ones are discarded and rerun, not mixed into the new results (the last use of this
    # module's sweep: it is rerun here)
    state = json.loads((run / "sweep.json").read_text())
    state["score_fp"] = "stale"
    (run / "sweep.json").write_text(json.dumps(state))
    r = _sweep(cfg, run, tiny_data_dir, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the scores changed since the trials ran" in r.stdout
    assert json.loads((run / "summary.json").read_text())["stage_runs"] == {"train": 1, "score": 2}
    rerun = {p: p.stat().st_mtime_ns for p in (run / "models" / "trials").glob("*/*/best-*/model.safetensors")}
    assert len(rerun) == 4 and not set(rerun.items()) & set(after.items())
