"""A cluster is more than one disk: storage URIs, and a two-node Ray cluster whose worker node cannot see the
driver's files (its `ray start` runs in its own mount namespace with private tmpfs over the driver's temp dirs).

What both nodes share is only what a real cluster shares: the network (127.0.0.1 here), the S3 endpoint (moto),
and the inputs every node is given (the model and data dir, under /var/tmp, as an image or an NFS mount would).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RAY_BIN, free_port, kill_processes_mentioning, node_processes, s3_keys
from test_ray import _write_cfg

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- storage, no Ray

def test_storage_on_s3_and_local_round_trips(s3, tmp_path):
    from sparsecse import SparseCSEError
    from sparsecse.core.storage import Storage

    src = tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.bin").write_bytes(b"\x00" * 10)
    (src / "manifest.json").write_text("{}")
    for uri in (f"s3://{s3.bucket}/unit", str(tmp_path / "local")):
        st = Storage(uri)
        assert not st.exists() and st.list() == []
        st.write_json("x/state.json", {"a": 1})
        assert st.read_json("x/state.json") == {"a": 1} and st.is_file("x/state.json") and st.is_dir("x")
        st.upload_dir(src, "m")
        assert st.list("m") == ["manifest.json", "sub"]
        got = st.download_dir("m", tmp_path / f"got-{len(uri)}")
        assert (got / "sub" / "a.bin").read_bytes() == b"\x00" * 10
        assert st.rel(st.path("m/sub")) == "m/sub"
        st.copy_dir("m", "m2")
        assert st.is_file("m2/sub/a.bin")
        st.delete("m")
        assert not st.exists("m") and st.exists("m2")
        with pytest.raises(SparseCSEError, match="not found in the run"):
            st.read_bytes("nope")
    assert sorted(k.split("/", 1)[1] for k in s3_keys("unit/")) == ["m2/manifest.json", "m2/sub/a.bin",
                                                                    "x/state.json"]
    with pytest.raises(SparseCSEError, match="--out nosuch://b/r: cannot open this storage"):
        Storage("nosuch://b/r")


# --------------------------------------------------------------------------- the cluster

@pytest.fixture(scope="module")
def node_inputs(tiny_model_dir, tiny_data_dir):
    """The model and data every node is given (as an image or an NFS mount would): outside /tmp."""
    d = Path("/var/tmp") / f"sparsecse-test-{os.getpid()}"
    shutil.copytree(tiny_model_dir, d / "model")
    shutil.copytree(tiny_data_dir, d / "data")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def private_tmp_cluster(node_inputs, s3, tmp_path_factory):
    """Head: `ray start --head` on this machine. Worker: `ray start --address` inside `unshare -m` with fresh tmpfs
    mounts over the driver's temp dirs (pytest's base temp, where every run dir and the job's cwd live, and the head's
    Ray session), so it sees nothing the driver writes there — while the Python environment, wherever the checkout
    is, stays visible as it would be in a node's image. 1 CPU each, token auth, every port on 127.0.0.1 chosen free."""
    token = node_inputs / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, **s3.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    port, dash, wport = free_port(), free_port(), free_port()
    head_tmp, worker_tmp = f"/tmp/scse-h-{os.getpid()}", f"/tmp/scse-w-{os.getpid()}"

    def run(*args):
        return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=300, check=True)

    try:
        run(RAY_BIN, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
            f"--temp-dir={head_tmp}", "--disable-usage-stats")
        hidden = [str(tmp_path_factory.getbasetemp()), head_tmp]
        run("unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$1" && mount -t tmpfs tmpfs "$2" && shift 2 && '
            'exec "$@"', "sh", *hidden, RAY_BIN, "start",
            f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            f"--node-manager-port={wport}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={worker_tmp}")
        worker_node, pids = node_processes(wport)
        yield {"env": env, "address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}",
               "worker_node": worker_node, "worker_pid": pids[0], "worker_port": wport}
    finally:
        kill_processes_mentioning(head_tmp)
        kill_processes_mentioning(worker_tmp)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)


@pytest.mark.slow
def test_worker_node_really_has_a_private_tmp(private_tmp_cluster, tmp_path):
    marker = tmp_path / "driver-side-file"
    marker.write_text("x")
    seen = subprocess.run(["nsenter", "-t", str(private_tmp_cluster["worker_pid"]), "-m", "ls", str(marker)],
                          capture_output=True, text=True)
    assert seen.returncode != 0  # the worker node cannot see what the driver writes under /tmp


@pytest.mark.slow
def test_local_out_that_a_node_cannot_see_fails_early_in_one_line(private_tmp_cluster, node_inputs, tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", node_inputs / "model", sparsities=(0.1,), lams=(0.5,))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "sparsecse", "sweep", str(cfg), "--out", str(tmp_path / "run"),
                        "--data-dir", str(node_inputs / "data"), "--address", private_tmp_cluster["address"],
                        "--set", "ray.num_cpus=null"], capture_output=True, text=True,
                       env=private_tmp_cluster["env"], timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("sparsecse: error: node ") and f"({private_tmp_cluster['worker_node'][:8]})" in last
    assert "cannot see --out" in last and "s3://" in last
    assert "Traceback" not in r.stderr and time.time() - t0 < 120
    assert not (tmp_path / "run" / "stage1").exists()  # refused before any stage ran


def _trial_records_on_s3(st, prefix: str) -> dict[str, list[dict]]:
    """Every trial result Tune has synced to the bucket so far, per trial name (a partial line is skipped)."""
    recs: dict[str, list[dict]] = {}
    for k in (k for k in s3_keys(prefix) if k.endswith("/result.json")):
        for line in st.read_bytes(k.split("/", 1)[1]).decode().splitlines():
            if line.strip().endswith("}"):
                r = json.loads(line)
                recs.setdefault(r.get("trial"), []).append(r)
    return recs


@pytest.fixture(scope="module")
def job(private_tmp_cluster, node_inputs, s3, tmp_path_factory):
    """`ray job submit --working-dir` of a sweep to the two nodes that share no disk, --out on S3 — and, while a
    trial runs on the worker node (it has reported, so its checkpoint is in the bucket), that node dies: raylet and
    workers SIGKILLed (issue 7, fault 5). The finished job, for the tests below. (The last user of this module's
    cluster: it has one node left afterwards.)"""
    from sparsecse.core.staging import stage
    from sparsecse.core.storage import Storage

    c, tmp = private_tmp_cluster, tmp_path_factory.mktemp("job")
    cfg = _write_cfg(tmp / "job.yaml", node_inputs / "model", sparsities=(0.1, 0.2), lams=(0.5,))
    cfg.write_text(cfg.read_text().replace("max_steps: 4, eval_steps: 2", "max_steps: 60, eval_steps: 2"))
    out = f"s3://{s3.bucket}/job"
    st = Storage(out)
    # the data and the model staged once in the bucket: each node fetches and verifies its own copy (its cache in
    # its own /tmp), and no node reads a local data dir or model
    staged = stage(f"s3://{s3.bucket}/staged", node_inputs / "data", f"{node_inputs / 'model'}@v1")
    cmd = [RAY_BIN, "job", "submit", f"--address={c['dashboard']}", f"--working-dir={REPO}",
           "--runtime-env-json", json.dumps({"env_vars": {"SPARSECSE_CACHE": "/tmp/sparsecse-node-cache"}}), "--",
           sys.executable, "-m", "sparsecse", "sweep", str(cfg), "--out", out, "--data-dir", staged["data.dir"],
           "--set", f"model.name={staged['model.name']}", "--set", "ray.num_cpus=null"]
    log = tmp / "job.log"
    deadline = time.time() + 180
    while True:  # right after `ray start` the head's job agent may not be up yet: the job is not created then
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, env=c["env"], cwd=tmp, stdout=f, stderr=subprocess.STDOUT, text=True)
        victim, until = None, time.time() + 600
        while victim is None and time.time() < until and proc.poll() is None:
            for name, rs in _trial_records_on_s3(st, "job/tune/").items():
                if any(r.get("node_id") == c["worker_node"] and not r.get("evaluated") for r in rs):
                    victim = name
            time.sleep(0.5)
        if victim is not None or proc.poll() is None:
            break
        if "No available agent to submit job" not in log.read_text() or time.time() > deadline:
            raise AssertionError("no trial ran on the worker node before the job ended:\n" + log.read_text()[-4000:])
        time.sleep(3)
    assert victim is not None, "no trial on the worker node reached the bucket within 10 minutes"
    for pid in node_processes(c["worker_port"])[1]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=900)
    return {"rc": proc.returncode, "log": log.read_text(), "out": out, "store": st, "victim": victim, "cwd": tmp,
            "keys": {k.split("/", 1)[1] for k in s3_keys("job/")}, "records": _trial_records_on_s3(st, "job/tune/")}


@pytest.mark.slow
def test_submitted_job_succeeds_with_report_results_and_export_in_the_bucket(job):
    assert job["rc"] == 0 and "succeeded" in job["log"].lower(), job["log"][-5000:]
    for f in ("report.md", "report.html", "results.parquet", "results.json", "summary.json", "sweep.json",
              "scores.parquet", "simcse/best/manifest.json", "export/manifest.json", "export/pruned/config.json",
              "figures/sts_avg_vs_sparsity.png"):
        assert f in job["keys"], f
    assert any(k.startswith("tune/") and "/checkpoint_" in k for k in job["keys"])
    assert any(k.startswith("tensorboard/s0.100") for k in job["keys"])
    assert any(k.startswith("tensorboard/simcse") for k in job["keys"])
    res = job["store"].read_json("results.json")
    assert sorted(t["sparsity"] for t in res["trials"]) == [0.1, 0.2] and all(t["status"] == "done" for t in res["trials"])


@pytest.mark.slow
def test_trials_are_placed_on_both_nodes(job, private_tmp_cluster):
    nodes = {r["node_id"] for rs in job["records"].values() for r in rs}
    assert private_tmp_cluster["worker_node"] in nodes and len(nodes) == 2


@pytest.mark.slow
def test_a_trial_on_the_dead_node_resumes_on_the_head_from_its_checkpoint_in_the_bucket(job, private_tmp_cluster):
    recs = job["records"][job["victim"]]
    worker = private_tmp_cluster["worker_node"]
    assert recs[-1]["evaluated"] and recs[-1]["node_id"] != worker  # finished on the head
    first_after = next(r for r in recs if r["node_id"] != worker)
    assert first_after["step"] > 2  # restored from its checkpoint in the bucket, not from step 0


@pytest.mark.slow
def test_the_dashboard_listens_on_localhost_only(job, private_tmp_cluster):
    port = private_tmp_cluster["dashboard"].rsplit(":", 1)[1]
    listen = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout if shutil.which("ss") else ""
    assert f"0.0.0.0:{port}" not in listen and f"*:{port}" not in listen


@pytest.mark.slow
def test_nothing_of_an_s3_run_lands_on_the_local_disk(job):
    assert not (job["cwd"] / "s3:").exists() and not (REPO / "s3:").exists()
    assert not [p for p in job["cwd"].rglob("*") if p.name in ("report.md", "scores.parquet", "results.json")]


@pytest.mark.slow
def test_the_export_comes_back_from_the_bucket_with_one_command_and_loads(job, private_tmp_cluster, tmp_path):
    from sentence_transformers import SentenceTransformer

    exp = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "sparsecse", "export", job["out"], "--out", str(exp)],
                       capture_output=True, text=True, env=private_tmp_cluster["env"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert SentenceTransformer(str(exp)).encode(["a man plays a guitar"]).shape == (1, 32)
