"""Reliability: faults survived, failures reported, nothing half-written (issue: reliability and security).

Faults are injected by a training callback the workers load (tests/faults.py, SPARSECSE_FAULT); each test runs a real sweep of the
tiny model on a local Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.interrupt import start_sweep, wait_for
from conftest import kill_processes_mentioning
from test_ray import _sweep, _write_cfg

pytestmark = pytest.mark.slow


# The rank-0 Ray Train worker killed mid-stage-1 and resumed from its checkpoint: tests/test_ray.py's module sweep
# injects it beside its crashed trial (test_stage1_worker_killed_mid_training_resumed_from_its_checkpoint).


def test_ray_train_worker_killed_without_retries_fails_cleanly(tmp_path, tiny_model_dir, tiny_data_dir):
    _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.1,), lams=(0.5,))
    r = _sweep(tmp_path / "c.yaml", tmp_path / "run", tiny_data_dir, "--set", "ray.max_failures=0",
               env={"SPARSECSE_FAULT": "stage1-kill:2"})
    assert r.returncode == 2
    # Ray's own worker logs are forwarded to stderr; sparsecse's last word is one line, no traceback of ours
    assert r.stderr.strip().splitlines()[-1].startswith("sparsecse: error: stage-1 training failed")
    assert 'sparsecse/__main__.py", line' not in r.stderr
    assert not (tmp_path / "run" / "export").exists() and not (tmp_path / "run" / "simcse").exists()


# A diverging (non-finite) trial: tests/test_ray.py's ASHA sweep injects one beside its weak trial.


def _start_sweep(cfg: Path, run: str, data: Path, ray_tmp: Path, log: Path, *extra: str, fault: str = ""):
    """`sparsecse sweep` as a process group of its own (its local Ray in `ray_tmp`), output to `log`; a test kills it."""
    import faults

    env = {**os.environ, "SPARSECSE_DASHBOARD": "0", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    if fault:
        env.update(faults.env(fault))
    return start_sweep([str(cfg), "--out", run, "--data-dir", str(data), *extra], env, log)


def _kill(proc: subprocess.Popen, ray_tmp: Path) -> None:
    """The driver and the local Ray it started die at once (never `ray stop`: other Rays may be running)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_processes_mentioning(str(ray_tmp))
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_for(what: str, proc: subprocess.Popen, found) -> None:
    wait_for(what, proc, found, timeout_s=600)  # raises when the sweep ends first or 10 minutes pass


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, tiny_model_dir, tiny_data_dir, s3):
    """--out s3://…: the driver and its Ray die twice — mid-stage-1 (once stage 1 has a checkpoint in the bucket),
    and, after the first `--resume`, once a trial has finished — then `--resume` from the same URI finishes.
    Stress-run outside CI (issue 23: a resumed sweep once dropped a finished trial), 20 repetitions:
        for i in $(seq 20); do python -m pytest -q -s -p no:cacheprovider tests/test_faults.py -k "driver_killed and not same_choice" || break; done
    Ninth session, with the trial kill alone (before the stage-1 kill joined this fixture): 20 of 20 passed, every
    grid point back each time (81–143 s a repetition); the restored experiment lacked no point in any of them, so
    the tune-missing/ recovery did not have to run (tests/test_stages.py drives it with a lost point).
    """
    from conftest import s3_keys
    from sparsecse.core.storage import Storage

    tmp = tmp_path_factory.mktemp("killed")
    cfg = _write_cfg(tmp / "c.yaml", tiny_model_dir, sparsities=(0.1, 0.2, 0.3), lams=(0.5,))
    cfg.write_text(cfg.read_text().replace("num_cpus: 2}", "num_cpus: 2, lock_stale_s: 8}"))  # heartbeat every 2 s
    run, st = f"s3://{s3.bucket}/killed", Storage(f"s3://{s3.bucket}/killed")
    ray_tmp = Path("/tmp") / f"scse-drv-{os.getpid()}"  # the driver's local Ray lives here (short: socket paths)
    # 1. killed mid-stage-1: rank 0 lingers 6 s before each report, time to kill once a checkpoint is in the bucket
    proc = _start_sweep(cfg, run, tiny_data_dir, ray_tmp, tmp / "first.log", fault="stage1-slow:6")
    # meanwhile (while Ray Train starts stage 1) a second driver on the same run, as a retried job's --resume:
    # refused while the first one beats
    _wait_for("the driver's lock and state", proc,
              lambda: {"killed/driver.lock", "killed/sweep.json"} <= set(s3_keys("killed/")))
    t0 = time.time()
    second = _sweep(cfg, run, tiny_data_dir, "--resume")
    second_driver = {"rc": second.returncode, "stderr": second.stderr, "s": time.time() - t0}
    def stage1_checkpointed() -> bool:  # Ray Train's snapshot lists a checkpoint: what a restart restores from
        if "killed/stage1/checkpoint_manager_snapshot.json" not in s3_keys("killed/stage1/"):
            return False
        snap = json.loads(st.read_bytes("stage1/checkpoint_manager_snapshot.json"))
        return bool(snap.get("latest_checkpoint_result"))

    _wait_for("a stage-1 checkpoint", proc, stage1_checkpointed)
    _kill(proc, ray_tmp)
    # 2. resumed, then killed again once Tune has recorded a trial as done
    proc = _start_sweep(cfg, run, tiny_data_dir, ray_tmp, tmp / "second.log", "--resume")
    finished: dict[str, float] = {}  # checkpoint objects of a trial Tune recorded as done, read before the kill

    def a_trial_finished() -> bool:
        keys = s3_keys("killed/tune/")
        for k in (k for k in keys if k.endswith("/result.json")):
            recs = [json.loads(x) for x in st.read_bytes(k.split("/", 1)[1]).decode().splitlines()
                    if x.strip().endswith("}")]
            if any(r.get("evaluated") for r in recs):  # Tune syncs result.json together with its experiment state
                trial = k.split("/")[2]
                finished.update({c: t for c, t in keys.items() if c.split("/")[2] == trial and "/checkpoint_" in c})
        return bool(finished)

    _wait_for("a finished trial", proc, a_trial_finished)
    _kill(proc, ray_tmp)
    # 3. resumed to the end
    r = _sweep(cfg, run, tiny_data_dir, "--resume")
    print(f"[stress] restored experiment lacked points: {'lacks' in r.stdout}")  # -s shows it (the stress loop)
    return {"result": r, "store": st, "finished": finished, "after": s3_keys("killed/tune/"), "cfg": cfg, "tmp": tmp,
            "second_log": (tmp / "second.log").read_text(), "second_driver": second_driver,
            "lock_after": "killed/driver.lock" in s3_keys("killed/")}


def test_a_second_driver_on_a_live_run_is_refused_in_one_line_and_a_killed_ones_lock_is_taken_over(
        killed_and_resumed):
    """One driver per run: while the first driver beats, a `--resume` of the same run exits 2 with one line naming
    the other driver; once that driver is killed, the next `--resume` takes its lock over at once (same host, its
    process gone), and a finished sweep leaves no lock behind."""
    d = killed_and_resumed["second_driver"]
    err = d["stderr"].strip().splitlines()
    assert d["rc"] == 2 and len(err) == 1 and "another driver is running this sweep" in err[0], d
    assert "taking over the run from a driver that stopped" in killed_and_resumed["second_log"]
    assert killed_and_resumed["result"].returncode == 0 and not killed_and_resumed["lock_after"]


def test_driver_killed_mid_stage1_resumes_stage1_from_its_last_checkpoint(killed_and_resumed):
    """The first `--resume` continues stage 1 from its checkpoint in the bucket (Ray Train hands it to the
    workers) instead of retraining from step 0."""
    assert "stage 1 resumes from its last checkpoint" in killed_and_resumed["second_log"]
    hist = killed_and_resumed["store"].read_json("simcse/history.json")
    assert hist["resumed_at"] and hist["resumed_at"][0] > 0  # the first step after the restart is not 0
    assert [h["step"] for h in hist["history"]] == [2, 4]  # one history, no step twice


def test_driver_killed_then_resumed_on_s3_reruns_nothing_finished(killed_and_resumed):
    """The last resume keeps stage 1, the scores and every trial that had finished training (its checkpoints
    untouched)."""
    k = killed_and_resumed
    assert k["result"].returncode == 0, k["result"].stdout[-3000:] + k["result"].stderr[-3000:]
    assert {c: k["after"].get(c) for c in k["finished"]} == k["finished"]
    assert k["store"].read_json("summary.json")["stage_runs"] == {"train": 1, "score": 1}


def test_driver_killed_then_resumed_every_grid_point_came_back(killed_and_resumed):
    res = killed_and_resumed["store"].read_json("results.json")
    assert sorted(t["sparsity"] for t in res["trials"]) == [0.1, 0.2, 0.3]
    assert all(t["status"] == "done" for t in res["trials"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> dict:
    """The selection of the interrupted sweeps' config (sparsities 0.1–0.3 at λ 0.5) run once without interruption."""
    tmp = tmp_path_factory.mktemp("ref")
    r = _sweep(_write_cfg(tmp / "c.yaml", tiny_model_dir, sparsities=(0.1, 0.2, 0.3), lams=(0.5,)), tmp / "ref",
               tiny_data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / "ref" / "results.json").read_text())["selected"]


def test_driver_killed_then_resumed_makes_the_same_choice_as_an_uninterrupted_sweep(killed_and_resumed,
                                                                                    uninterrupted):
    res = killed_and_resumed["store"].read_json("results.json")
    assert (res["selected"]["sparsity"], res["selected"]["lam"]) == (uninterrupted["sparsity"], uninterrupted["lam"])
    assert res["selected"]["dev_mean"] == pytest.approx(uninterrupted["dev_mean"], abs=1e-6)


def test_ctrl_c_at_every_stage_exits_130_and_resume_makes_the_same_choice(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                         uninterrupted):
    """Ctrl-C belongs to the sweep. A terminal's SIGINT (to the whole process group) during stage 1, again during
    scoring and again during the trials (benchmarks/interrupt.py, which runs the same on the quickstart): each time
    the driver stops promptly, writes no report or summary claiming it finished, prints one line with the resume
    command and exits 130; `--resume` then completes to the same choice as an uninterrupted sweep of the same
    config."""
    from benchmarks.interrupt import interrupt_each_stage, same_choice

    import faults

    cfg = _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.1, 0.2, 0.3), lams=(0.5,))
    run = tmp_path / "run"
    # stage 1's rank 0 lingers 3 s per report: a window to interrupt it
    res = interrupt_each_stage(cfg, run, tiny_data_dir, tmp_path / "logs", timeout_s=600,
                               env=faults.env("stage1-slow:3"))
    for row in res["interrupts"]:
        out = Path(row["log"]).read_text()
        assert row["rc"] == 130 and row["exit_s"] < 30 and not row["claims_finished"], f"{row}\n{out[-4000:]}"
        assert row["last_line"].startswith("sparsecse: interrupted; nothing was lost — resume with: "
                                           f"sparsecse sweep {cfg} --out {run} --resume"), out
        assert "Traceback" not in out, out
    _, scoring, trials = (Path(r["log"]).read_text() for r in res["interrupts"])
    assert "stage 1 resumes from its last checkpoint" in scoring  # the first interrupt came mid-stage-1
    assert "[sweep] trials" not in scoring  # the second stopped within scoring
    assert "[sweep] trials" in trials and "[sweep] done" not in trials
    final = res["final"]
    assert final["rc"] == 0, Path(final["log"]).read_text()[-3000:]
    assert same_choice(final["selected"], uninterrupted), (final["selected"], uninterrupted)
