"""GPU nodes on a Ray cluster without a GPU: a node that declares a GPU torch cannot use is refused by the node
check before stage 1, also when it joins while the driver waits; Ray's own autoscaler (its fake multi-node
provider) adds a GPU worker for the waiting sweep. Split from tests/test_faults.py so the parallel suite balances."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.interrupt import wait_for
from conftest import kill_processes_mentioning
from test_ray import _sweep, _write_cfg

pytestmark = pytest.mark.slow


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
        wait_for("the driver waiting for a GPU", proc, lambda: "waiting up to" in log.read_text(), timeout_s=600)
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
