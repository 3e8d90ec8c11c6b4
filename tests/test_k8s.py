"""A config or input error never reaches KubeRay's retries: `sparsecse sweep --check` finds it without a cluster,
and `sparsecse k8s-submit` runs that check in a Kubernetes Job that fails at once on exit 2 before it applies the
RayJob. kubectl is a fake here (a script that records what it is asked and answers with a Job's status)."""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
from pathlib import Path

import pytest
import yaml

from sparsecse import RunFailed, SparseCSEError
from sparsecse.cli import main

REPO = Path(__file__).resolve().parents[1]
RAYJOB = REPO / "cluster" / "rayjob.yaml"

FAKE_KUBECTL = """#!{python}
import json, os, sys
args = sys.argv[1:]
if args[:1] == ["-n"]:
    args = args[2:]
stdin = sys.stdin.read() if "-" in args else None
with open(os.environ["KUBECTL_LOG"], "a") as f:
    f.write(json.dumps({{"args": args, "stdin": stdin}}) + "\\n")
outcome = os.environ["KUBECTL_OUTCOME"]
if args[:2] == ["get", "job"]:
    polls = os.environ["KUBECTL_LOG"] + ".polls"
    n = int(open(polls).read()) + 1 if os.path.exists(polls) else 1
    open(polls, "w").write(str(n))
    cond = {{"passed": ("Complete", "CompletionsReached"), "config": ("Failed", "PodFailurePolicy"),
             "failed": ("Failed", "BackoffLimitExceeded")}}[outcome]
    conds = [{{"type": cond[0], "status": "True", "reason": cond[1]}}] if n >= 2 else []  # running at first
    print(json.dumps({{"status": {{"conditions": conds}}}}))
elif args[:1] == ["logs"]:
    print("sparsecse: error: config train.batch_size: 10 is not divisible by ray.num_workers=4")
"""


@pytest.fixture
def kubectl(tmp_path, monkeypatch):
    path = tmp_path / "kubectl"
    path.write_text(FAKE_KUBECTL.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "kubectl.log"
    monkeypatch.setenv("KUBECTL_LOG", str(log))

    def calls() -> list[dict]:
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    return str(path), calls


def _rayjob() -> dict:
    return next(d for d in yaml.safe_load_all(RAYJOB.read_text()) if d["kind"] == "RayJob")


def test_the_check_job_runs_the_rayjobs_entrypoint_with_check_and_fails_at_once_on_exit_2():
    from sparsecse.ops.k8s import check_job

    job = check_job(_rayjob())
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    head = _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert job["apiVersion"] == "batch/v1" and job["metadata"]["name"] == "sparsecse-sweep-check"
    assert pod["restartPolicy"] == "Never"  # Kubernetes requires it for a podFailurePolicy
    assert pod["serviceAccountName"] == head["serviceAccountName"]  # the same bucket access as the driver
    c = pod["containers"][0]
    assert c["image"] == head["containers"][0]["image"] and "nvidia.com/gpu" not in str(c["resources"])
    argv = shlex.split(c["command"][-1])
    assert argv == shlex.split(_rayjob()["spec"]["entrypoint"]) + ["--check"]
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "check", "operator": "In", "values": [2]}} in rules
    assert spec["backoffLimit"] >= 1  # anything else (a pull error, an eviction) is retried


def test_k8s_submit_applies_the_rayjob_only_after_the_check_passed(kubectl, monkeypatch, capsys):
    path, calls = kubectl
    monkeypatch.setenv("KUBECTL_OUTCOME", "passed")
    from sparsecse.ops.k8s import submit

    msg = submit(RAYJOB, namespace="ml", kubectl=path, poll_s=0.01)
    assert "check passed; RayJob sparsecse-sweep submitted" in msg
    seen = calls()
    kinds = [c["args"][:2] for c in seen]
    applied_sa = json.loads(seen[0]["stdin"])["items"]
    assert [d["kind"] for d in applied_sa] == ["ServiceAccount"]  # what the check runs as, first
    assert kinds[1] == ["delete", "job"] and json.loads(seen[2]["stdin"])["kind"] == "Job"
    assert sum(k == ["get", "job"] for k in kinds) == 2  # polled until Complete
    assert seen[-1]["args"] == ["apply", "-f", str(RAYJOB)]  # the RayJob last, once
    assert sum(str(RAYJOB) in c["args"] for c in seen) == 1


@pytest.mark.parametrize("outcome,error,code", [("config", SparseCSEError, 2), ("failed", RunFailed, 1)])
def test_a_failed_check_submits_nothing_and_says_why_in_one_line(kubectl, monkeypatch, capsys, outcome, error, code):
    path, calls = kubectl
    monkeypatch.setenv("KUBECTL_OUTCOME", outcome)
    from sparsecse.ops.k8s import submit

    with pytest.raises(error) as e:
        submit(RAYJOB, kubectl=path, poll_s=0.01)
    assert "train.batch_size: 10 is not divisible" in str(e.value) and "nothing was submitted" in str(e.value)
    assert "\n" not in str(e.value) and all(str(RAYJOB) not in c["args"] for c in calls())
    assert type(e.value) is error
    os.remove(os.environ["KUBECTL_LOG"])
    os.remove(os.environ["KUBECTL_LOG"] + ".polls")
    assert main(["k8s-submit", str(RAYJOB), "--kubectl", path]) == code
    assert "sparsecse: error: " in capsys.readouterr().err


def test_k8s_submit_refuses_a_file_without_a_rayjob_or_a_missing_kubectl(tmp_path, capsys):
    (tmp_path / "sa.yaml").write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n")
    assert main(["k8s-submit", str(tmp_path / "sa.yaml")]) == 2
    assert "holds no RayJob" in capsys.readouterr().err
    assert main(["k8s-submit", str(RAYJOB), "--kubectl", str(tmp_path / "no-kubectl")]) == 2
    assert "not found; install kubectl" in capsys.readouterr().err


def _cfg(tmp_path: Path, model: Path, extra: str = "") -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {{name: {model}}}\neval: {{tasks: [STSBenchmark, SICKRelatedness]}}\n"
                 f"sweep: {{sparsities: [0.1], lams: [0.5]}}\n{extra}")
    return p


def test_sweep_check_passes_a_good_run_and_leaves_nothing(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    cfg, out = _cfg(tmp_path, tiny_model_dir), tmp_path / "run"
    assert main(["sweep", str(cfg), "--out", str(out), "--data-dir", str(tiny_data_dir), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "[check] ok" in printed and f"would start a new sweep in {out}" in printed
    assert not out.exists()  # nothing written, no directory made


@pytest.mark.parametrize("case,needle", [
    ("config", "train.batch_size: 10 is not divisible by ray.num_workers=4"),
    ("data", "is missing"),
    ("out", "already holds something else"),
    ("resume", "holds no sweep"),
])
def test_sweep_check_finds_what_the_sweep_would_refuse(tmp_path, tiny_model_dir, tiny_data_dir, capsys, case, needle):
    import shutil

    extra = "train: {batch_size: 10}\nray: {num_workers: 4}\n" if case == "config" else ""
    cfg, out, data = _cfg(tmp_path, tiny_model_dir, extra), tmp_path / "run", tiny_data_dir
    if case == "data":
        data = tmp_path / "data"
        shutil.copytree(tiny_data_dir, data)
        (data / "senteval" / "STS" / "STSBenchmark" / "sts-dev.csv").unlink()
    if case == "out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    argv = ["sweep", str(cfg), "--out", str(out), "--data-dir", str(data), "--check"]
    assert main(argv + (["--resume"] if case == "resume" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    if case == "out":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]  # untouched


def test_sweep_check_into_missing_parents_leaves_no_folder_behind(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    cfg, out = _cfg(tmp_path, tiny_model_dir), tmp_path / "a" / "b" / "run"
    assert main(["sweep", str(cfg), "--out", str(out), "--data-dir", str(tiny_data_dir), "--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # neither run/ nor a/b/ was left


def test_sweep_check_resume_is_refused_while_a_live_driver_holds_the_run(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                         capsys):
    """`--check --resume` says what the real `--resume` would: refused while another driver's heartbeat moves;
    "would resume" once that driver is gone."""
    import json
    import threading
    import time

    from sparsecse.core.config import load_config
    from sparsecse.core.storage import Storage
    from sparsecse.run.runlock import LOCK

    cfg, out = _cfg(tmp_path, tiny_model_dir, "ray: {lock_stale_s: 4}\n"), tmp_path / "run"
    store = Storage(out)
    store.write_json("sweep.json", {"config": load_config(str(cfg)).to_dict()})
    argv = ["sweep", str(cfg), "--out", str(out), "--data-dir", str(tiny_data_dir), "--check", "--resume"]
    stop = threading.Event()

    def beat():  # another driver, on another host, alive: its heartbeat moves every half second
        while not stop.is_set():
            store.write_text(LOCK, json.dumps({"owner": "other", "host": "elsewhere", "pid": 1,
                                               "heartbeat": time.time()}) + "\n")
            time.sleep(0.5)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        time.sleep(0.2)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another driver is running this sweep (host elsewhere" in err[0], err
    finally:
        stop.set()
        t.join()
    time.sleep(4.1)  # the other driver stopped: its lock goes stale
    assert main(argv) == 0 and "would resume" in capsys.readouterr().out
