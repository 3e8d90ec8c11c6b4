"""Reliability: faults survived, failures reported, nothing half-written (issue: reliability and security).

Faults are injected by a training callback the workers load (tests/faults.py, SPARSECSE_FAULT); each test runs a real sweep of the
tiny model on a local Ray."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        env.update(faults.ENV, SPARSECSE_FAULT=fault, PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(faults.__file__).parent), os.environ.get("PYTHONPATH")])))
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "sparsecse", "sweep", str(cfg), "--out", run, "--data-dir",
                                 str(data), *extra], env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill(proc: subprocess.Popen, ray_tmp: Path) -> None:
    """The driver and the local Ray it started die at once (never `ray stop`: other Rays may be running)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_processes_mentioning(str(ray_tmp))
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_for(what: str, proc: subprocess.Popen, found) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not found():
        time.sleep(0.5)
    assert proc.poll() is None, f"the sweep ended before {what}"
    assert found(), f"no {what} within 10 minutes"


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


def test_a_trial_given_a_gpu_cuda_cannot_use_fails_in_one_line_instead_of_training_on_the_cpu(
        tmp_path, tiny_model_dir, tiny_data_dir):
    """A Ray cluster whose GPU node joins after the sweep started (as an autoscaler adds one) and declares a GPU it
    does not have (as a node with a wrong torch wheel or an old driver looks to Ray). With the wait at 0 the sweep
    refuses at once in one line (no GPU yet); with ray.wait_for_resources_s it waits, says what for, and goes on
    when the node joins; then the node check, holding that GPU, refuses in one line naming the node, the driver
    and torch's CUDA build — before stage 1, never training on the CPU."""
    from conftest import RAY_BIN, free_port

    head_tmp = f"/tmp/scse-gpu-{os.getpid()}"
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "SPARSECSE_DASHBOARD": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    ray = dict(env=env, capture_output=True, text=True, timeout=300, check=True)
    subprocess.run([RAY_BIN, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={head_tmp}", "--disable-usage-stats"], **ray)
    try:
        cfg = _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.1,), lams=(0.5,))
        args = ["--address", f"127.0.0.1:{port}", "--set", "sweep.trial_gpus=1", "--set", "ray.num_cpus=null"]
        now = _sweep(cfg, tmp_path / "now", tiny_data_dir, *args, env=env)
        err = now.stderr.strip().splitlines()
        assert now.returncode == 2 and "asks for a GPU but the Ray cluster has none" in err[-1], now.stderr[-2000:]
        e = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        log = tmp_path / "wait.log"
        with log.open("w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "sparsecse", "sweep", str(cfg), "--out", str(tmp_path / "run"),
                                     "--data-dir", str(tiny_data_dir), *args, "--set", "ray.wait_for_resources_s=120"],
                                    env=e, stdout=f, stderr=subprocess.STDOUT)
        _wait_for("the driver waiting for a GPU", proc, lambda: "waiting up to" in log.read_text())
        subprocess.run([RAY_BIN, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", "--num-gpus=1", "--disable-usage-stats"], **ray)  # the GPU node joins
        proc.wait(timeout=600)
    finally:
        kill_processes_mentioning(head_tmp)
        kill_processes_mentioning(f"127.0.0.1:{port}")  # the joined node's processes (the head's temp dir or not)
        shutil.rmtree(head_tmp, ignore_errors=True)
    out = log.read_text()
    assert "the cluster now has 3 CPU, 1 GPU" in out, out[-3000:]
    last = [x for x in out.strip().splitlines() if x.startswith("sparsecse: error: ")][-1]
    # refused by the node check (a task holding the node's GPU) before stage 1: node, driver and CUDA build named
    assert proc.returncode == 2 and "GPU: torch cannot use the GPU Ray gave this check" in last, out[-3000:]
    assert last.startswith("sparsecse: error: node ") and "driver " in last and "built for CUDA" in last
    assert not (tmp_path / "run" / "simcse").exists() and not (tmp_path / "run" / "tune").exists()  # nothing trained



def test_an_autoscaler_whose_gpu_workers_start_at_zero_adds_one_for_the_waiting_sweep(tmp_path, tiny_model_dir,
                                                                                       tiny_data_dir):
    """Ray's own autoscaler (its fake multi-node provider: nodes are local raylets) with GPU workers at min 0, as
    cluster/gpu-cluster.yaml and rayjob.yaml ship them: nothing adds a worker until someone asks. The waiting sweep
    asks for its bundles (request_resources), the autoscaler adds the GPU node, the sweep goes on (and its node
    check then refuses the GPU torch cannot use, as above), and the request is withdrawn so idle workers can go."""
    from conftest import RAY_BIN, free_port

    import ray._private.services as services

    port, ip = free_port(), services.get_node_ip_address()
    config = {"cluster_name": "scse-fake", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
              "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                           "disable_launch_config_check": True, "gcs_address": f"{ip}:{port}"},
              "head_node_type": "ray.head.default",
              "available_node_types": {
                  "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                  "gpu": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}},
              "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [],
              "rsync_filter": [], "file_mounts_sync_continuously": False, **{k: [] for k in (
                  "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                  "head_start_ray_commands", "worker_start_ray_commands")}}
    (tmp_path / "autoscaler.json").write_text(json.dumps(config))
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "SPARSECSE_DASHBOARD": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    env.pop("RAY_ADDRESS", None)
    head_tmp = f"/tmp/scse-asc-{os.getpid()}"
    subprocess.run([RAY_BIN, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    f"--autoscaling-config={tmp_path / 'autoscaler.json'}", f"--temp-dir={head_tmp}",
                    "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=300, check=True)
    try:
        cfg = _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.1,), lams=(0.5,))
        r = _sweep(cfg, tmp_path / "run", tiny_data_dir, "--address", f"{ip}:{port}", "--set", "sweep.trial_gpus=1",
                   "--set", "ray.num_cpus=null", "--set", "ray.wait_for_resources_s=240", env=env)
        monitor = "".join(p.read_text(errors="replace") for p in Path(head_tmp).glob("session_*/logs/monitor.log"))
    finally:
        kill_processes_mentioning(head_tmp)
        kill_processes_mentioning(f"{ip}:{port}")
        shutil.rmtree(head_tmp, ignore_errors=True)
    out = r.stdout + r.stderr
    assert "its autoscaler is asked for 2 bundle(s)" in out and "the cluster now has 3 CPU, 1 GPU" in out, out[-3000:]
    assert "GPU: torch cannot use the GPU Ray gave this check" in out  # the fake GPU, as in the test above
    assert "'GPU': 1" in monitor  # the autoscaler saw the sweep's request


def test_ctrl_c_in_stage1_and_in_the_trials_exits_130_and_resume_makes_the_same_choice(tmp_path, tiny_model_dir,
                                                                                       tiny_data_dir, uninterrupted):
    """Ctrl-C belongs to the sweep. A terminal's SIGINT (to the whole process group) during stage 1 and again during
    the trials: each time the driver stops promptly, writes no report or summary claiming it finished, prints one
    line with the resume command and exits 130; `--resume` then completes to the same choice as an uninterrupted
    sweep of the same config."""
    cfg = _write_cfg(tmp_path / "c.yaml", tiny_model_dir, sparsities=(0.1, 0.2, 0.3), lams=(0.5,))
    run = tmp_path / "run"
    ray_tmp = Path("/tmp") / f"scse-int-{os.getpid()}"

    def interrupt(log: Path, what: str, ready, *extra: str, fault: str = "") -> tuple[int, str, float]:
        proc = _start_sweep(cfg, str(run), tiny_data_dir, ray_tmp, log, *extra, fault=fault)
        try:
            _wait_for(what, proc, ready)
            t0 = time.time()
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
            rc = proc.wait(timeout=60)
            return rc, log.read_text(), time.time() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            kill_processes_mentioning(str(ray_tmp))
            shutil.rmtree(ray_tmp, ignore_errors=True)

    def stage1_running() -> bool:
        return (run / "stage1").is_dir() and any((run / "stage1").rglob("checkpoint_*"))

    rc, out, took = interrupt(tmp_path / "a.log", "a stage-1 checkpoint", stage1_running, fault="stage1-slow:3")
    assert rc == 130, out
    assert out.strip().splitlines()[-1].startswith("sparsecse: interrupted; nothing was lost — resume with: "
                                                  f"sparsecse sweep {cfg} --out {run} --resume"), out
    assert "Traceback" not in out and took < 30, (took, out)
    assert not (run / "summary.json").exists() and not (run / "simcse" / "best").exists()

    def a_trial_reported() -> bool:
        return any((run / "tune").glob("*/result.json")) if (run / "tune").is_dir() else False

    rc, out, took = interrupt(tmp_path / "b.log", "a trial's first report", a_trial_reported, "--resume")
    assert rc == 130 and "resume with:" in out.strip().splitlines()[-1] and took < 30, (rc, took, out)
    assert "[sweep] done" not in out and not (run / "summary.json").exists() and not (run / "report.md").exists()
    r = _sweep(cfg, str(run), tiny_data_dir, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = json.loads((run / "summary.json").read_text())["selected"]
    assert (resumed["sparsity"], resumed["lam"]) == (uninterrupted["sparsity"], uninterrupted["lam"])
    assert resumed["dev_mean"] == pytest.approx(uninterrupted["dev_mean"], abs=1e-6)
