"""Cluster operations: the driver asks an autoscaling cluster for its nodes and waits for them
(ray.wait_for_resources_s), on a fake clock and on Ray's own autoscaler (the fake multi-node provider). A real Ray
cluster gaining its GPU node after the sweep started is in tests/test_faults.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sparsecse import SparseCSEError
from sparsecse.core.config import load_config
from sparsecse.run.checks import wait_for_resources


class Cluster:
    """An autoscaler: resources grow `at` seconds after a request asks for a GPU (a worker node joining), and
    never without one (its workers start at zero)."""

    def __init__(self, before: dict, after: dict, at: float):
        self.t, self.before, self.after, self.at, self.requests, self.asked_at = 0.0, before, after, at, [], None

    def resources(self) -> dict:
        return self.after if self.asked_at is not None and self.t >= self.asked_at + self.at else self.before

    def request(self, bundles: list) -> None:
        self.requests.append(bundles)
        if any(b.get("GPU") for b in bundles) and self.asked_at is None:
            self.asked_at = self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_the_driver_waits_for_gpu_workers_an_autoscaler_adds(capsys):
    cfg = load_config(None, ["sweep.trial_gpus=1", "ray.wait_for_resources_s=120"])
    c = Cluster({"CPU": 4}, {"CPU": 12, "GPU": 1}, at=30)
    res = wait_for_resources(cfg, c.resources, c.request, sleep=c.sleep, clock=lambda: c.t)
    assert res == {"CPU": 12, "GPU": 1} and 30 <= c.t <= 35
    assert c.requests == [[{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], []]  # asked for once, withdrawn when there
    out = capsys.readouterr().out
    assert out.count("waiting up to 120 s for the cluster") == 1 and "asks for a GPU" in out
    assert "the cluster now has 12 CPU, 1 GPU" in out


def test_without_the_wait_or_past_it_the_preflight_refuses_in_one_line(capsys):
    c = Cluster({"CPU": 4}, {"CPU": 12, "GPU": 1}, at=30)
    with pytest.raises(SparseCSEError, match="sweep.trial_gpus: asks for a GPU but the Ray cluster has none"):
        wait_for_resources(load_config(None, ["sweep.trial_gpus=1"]), c.resources, c.request, sleep=c.sleep,
                           clock=lambda: c.t)
    assert c.t == 0 and capsys.readouterr().out == "" and c.requests == []  # at once: the default wait is 0
    with pytest.raises(SparseCSEError, match="asks for a GPU"):
        wait_for_resources(load_config(None, ["sweep.trial_gpus=1", "ray.wait_for_resources_s=10"]), c.resources,
                           c.request, sleep=c.sleep, clock=lambda: c.t)
    assert 10 <= c.t < 30 and c.requests[-1] == []  # a request that timed out is withdrawn too


def test_stage_one_on_gpus_asks_for_its_workers_bundles():
    from sparsecse.run.checks import demand

    gpu = load_config(None, ["ray.num_workers=4", "ray.use_gpu=true", "ray.cpus_per_worker=8", "sweep.trial_gpus=0.5"])
    assert demand(gpu) == [{"CPU": 8.0, "GPU": 1.0}] * 4
    assert demand(load_config(None, [])) == [{"CPU": 1.0}]


def test_stage1_workers_that_cannot_share_one_node_are_warned_about():
    from sparsecse.run.checks import stage1_topology

    four_gpu = [{"resources": {"CPU": 48, "GPU": 4}}, {"resources": {"CPU": 48, "GPU": 4}}]
    one_gpu = [{"resources": {"CPU": 8, "GPU": 1}}] * 4
    gpu = load_config(None, ["ray.num_workers=4", "ray.use_gpu=true"])
    assert stage1_topology(gpu, four_gpu) is None
    warning = stage1_topology(gpu, one_gpu)
    assert "4 workers (ray.num_workers) span nodes: the largest node fits 1" in warning
    cpu = load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=4"])
    assert stage1_topology(cpu, [{"resources": {"CPU": 8}}]) is None
    assert "fits 1" in stage1_topology(cpu, [{"resources": {"CPU": 6}}, {"resources": {"CPU": 6}}])
    assert stage1_topology(load_config(None, []), one_gpu) is None  # one worker: nothing to span


def test_the_cluster_files_fit_stage1_on_one_node_and_give_the_autoscaler_its_rights():
    """Both cluster files run the paper config's stage 1 on one machine (its ray.num_workers GPUs in one pod / one
    instance), and `ray up`'s head can launch workers and pass them their S3 role (an S3-only head role cannot)."""
    import json
    import shlex
    from pathlib import Path

    import yaml

    cluster = Path(__file__).resolve().parents[1] / "cluster"
    job = next(d for d in yaml.safe_load_all((cluster / "rayjob.yaml").read_text()) if d["kind"] == "RayJob")
    config = shlex.split(job["spec"]["entrypoint"])[4].replace("/home/ray/sparsecse/", "")
    workers = load_config(Path(__file__).resolve().parents[1] / config).ray.num_workers
    pod = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(pod["resources"]["limits"]["nvidia.com/gpu"]) >= workers
    gpus_of = {"g5.12xlarge": 4, "g5.48xlarge": 8, "p4d.24xlarge": 8, "p5.48xlarge": 8}
    up = yaml.safe_load((cluster / "gpu-cluster.yaml").read_text())
    nodes = up["available_node_types"]
    assert gpus_of[nodes["gpu_worker"]["node_config"]["InstanceType"]] >= workers
    head_profile = nodes[up["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    worker_profile = nodes["gpu_worker"]["node_config"]["IamInstanceProfile"]["Name"]
    head = json.loads((cluster / "iam" / "head-policy.json").read_text())["Statement"]
    actions = {a for st in head for a in st["Action"]}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole", "s3:PutObject"} <= actions
    passes = next(st for st in head if "iam:PassRole" in st["Action"])["Resource"]
    assert f"arn:aws:iam::*:role/{worker_profile}" in passes
    worker = json.loads((cluster / "iam" / "worker-policy.json").read_text())["Statement"]
    assert all(a.startswith("s3:") for st in worker for a in st["Action"])
    readme = (cluster / "README.md").read_text()
    assert f"for r in {head_profile} {worker_profile}; do" in readme


def test_the_live_report_is_rewritten_from_tunes_trial_results(tmp_path):
    """While the trials run, report.html in the run is the live page: every trial as Tune last heard of it, how many
    finished and the best dev so far; Tune's callback throttles the rewrites, writes at each trial's end, and
    pickles (Tune keeps it with the experiment)."""
    from types import SimpleNamespace

    import ray.cloudpickle

    from sparsecse.run import ray_adapter as ra
    from sparsecse.core.results import Point
    from sparsecse.run.outcome import LiveReport

    cfg = load_config(None, ["eval.tasks=[STSBenchmark]"])
    writer = LiveReport(str(tmp_path / "run"), cfg.to_dict(), 3, ("gradient", "none"))
    done = {**Point(0.1, 0.5, 1).params(), "evaluated": True, "step": 4, "best_stsb_dev": 81.25,
            "test/STSBenchmark": 77.5, "test/avg": 77.5}
    running = {**Point(0.3, 0.5, 1).params(), "evaluated": False, "step": 2, "best_stsb_dev": 80.0}
    trial = lambda m, status="RUNNING": SimpleNamespace(config=Point.from_params(m).params(), last_result=m,  # noqa
                                                         status=status)
    cb = ra.live_report_callback({"write": writer, "every_s": 3600})
    cb = ray.cloudpickle.loads(ray.cloudpickle.dumps(cb))
    cb.on_trial_complete(1, [trial(done, "TERMINATED"), trial(running)], None)
    page = (tmp_path / "run" / "report.html").read_text()
    assert "sweep in progress" in page and "1 of 3 trials finished" in page and "81.25" in page
    assert page.count("<tr>") == 3  # the header and two trials
    (tmp_path / "run" / "report.html").unlink()
    cb.on_trial_result(2, [trial(done, "TERMINATED"), trial(running)], None, running)
    assert not (tmp_path / "run" / "report.html").exists()  # throttled: the last write was just now


def test_a_wait_says_why_the_autoscaler_cannot_add_nodes_and_names_the_last_cause(capsys):
    """While the driver waits, each new autoscaler problem (a launch refused, a node that failed) is one line as it
    appears, never repeated; on giving up the one-line error names the last cause instead of only the timeout."""
    cfg = load_config(None, ["sweep.trial_gpus=1", "ray.wait_for_resources_s=30"])
    c = Cluster({"CPU": 4}, {"CPU": 12, "GPU": 1}, at=10 ** 9)  # never joins
    said = ["cannot launch node type gpu_worker: InsufficientInstanceCapacity: no g5.12xlarge in us-east-1a"]

    def problems():
        return said if c.t < 15 else said + ["1 node(s) of type gpu_worker failed to start (the head's monitor.log has why)"]

    with pytest.raises(SparseCSEError) as e:
        wait_for_resources(cfg, c.resources, c.request, sleep=c.sleep, clock=lambda: c.t, problems=problems)
    out = capsys.readouterr().out
    assert out.count("[sweep] autoscaler: cannot launch node type gpu_worker: InsufficientInstanceCapacity") == 1
    assert out.count("failed to start") == 1
    msg = str(e.value)
    assert "asks for a GPU" in msg and "the autoscaler's last report: 1 node(s) of type gpu_worker failed" in msg
    assert "\n" not in msg and c.requests[-1] == []


def test_autoscaler_problems_are_read_from_the_status_ray_publishes(monkeypatch):
    """The status the (v1) autoscaler writes into the GCS, built from Ray's own dataclasses: a node type the cloud
    refused (its category and message), failed nodes counted per type, the autoscaler's own error; nothing when
    all is well."""
    import json
    from dataclasses import asdict

    from ray._private import ray_constants
    from ray.autoscaler._private.autoscaler import AutoscalerSummary
    from ray.autoscaler._private.node_provider_availability_tracker import (NodeAvailabilityRecord,
                                                                            NodeAvailabilitySummary,
                                                                            UnavailableNodeInformation)
    from ray.experimental import internal_kv

    from sparsecse.run import ray_adapter as ra

    refused = NodeAvailabilityRecord("gpu_worker", False, 0.0, UnavailableNodeInformation(
        "InsufficientInstanceCapacity", "We currently do not have sufficient g5.12xlarge capacity\nin us-east-1a."))
    ok = NodeAvailabilityRecord("cpu_worker", True, 0.0, None)
    summary = AutoscalerSummary(active_nodes={}, idle_nodes={}, pending_nodes=[], pending_launches={},
                                failed_nodes=[("10.0.0.7", "gpu_worker"), ("10.0.0.8", "gpu_worker")],
                                node_availability_summary=NodeAvailabilitySummary({"gpu_worker": refused, "cpu_worker": ok}))
    kv = {ray_constants.DEBUG_AUTOSCALING_STATUS: json.dumps({"autoscaler_report": asdict(summary)}).encode(),
          ray_constants.DEBUG_AUTOSCALING_ERROR: b"Traceback (most recent call last):\n  ...\nbotocore: InvalidAMIID.NotFound\n"}
    monkeypatch.setattr(internal_kv, "_internal_kv_initialized", lambda: True)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key: kv.get(key))
    assert ra.autoscaler_problems() == [
        "cannot launch node type gpu_worker: InsufficientInstanceCapacity: We currently do not have sufficient "
        "g5.12xlarge capacity in us-east-1a.",
        "2 node(s) of type gpu_worker failed to start (the head's monitor.log has why)",
        "autoscaler error: botocore: InvalidAMIID.NotFound"]
    kv.clear()
    assert ra.autoscaler_problems() == []
    monkeypatch.setattr(internal_kv, "_internal_kv_initialized", lambda: False)
    assert ra.autoscaler_problems() == []


def test_after_ctrl_c_a_late_ray_call_cannot_start_a_new_local_ray():
    """An interrupted driver shuts Ray down while Tune's/Train's helper threads may still call into it; Ray would
    auto-start a fresh local cluster for such a call (and its cut-short start-up printed an error after the resume
    line). After shutdown(interrupted=True) the call raises instead, and no Ray is running."""
    import ray
    from ray._private import auto_init_hook

    from sparsecse.run import ray_adapter as ra

    import logging

    before, level = auto_init_hook.enable_auto_connect, logging.getLogger("ray").level
    try:
        ra.shutdown(interrupted=True)
        with pytest.raises(Exception):
            ray.put(1)
        assert not ray.is_initialized()
    finally:
        auto_init_hook.enable_auto_connect = before
        logging.getLogger("ray").setLevel(level)


def test_a_ray_call_ctrl_c_interrupted_counts_in_flight_until_it_ends_and_ray_is_left_to_it(monkeypatch):
    """Ctrl-C during off_main_thread's wait leaves the call running on its helper; shutting Ray down under it made
    Ray's C++ end the driver with exit 1 before the resume line (seen in CI at the trials). Python 3.11's
    Thread.join, interrupted, marks the still-running thread stopped, so the count must not come from is_alive();
    shutdown(interrupted=True) leaves Ray alone while a call is in flight, and shuts it down once none is."""
    import _thread
    import logging
    import threading

    import ray
    from ray._private import auto_init_hook

    from sparsecse.run import ray_adapter as ra

    release, started = threading.Event(), threading.Event()

    def call():
        started.set()
        release.wait(20)
        return "done"

    def ctrl_c():
        started.wait(5)
        time.sleep(0.3)
        _thread.interrupt_main()

    threading.Thread(target=ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        ra.off_main_thread(call)
    helper = next(t for t in threading.enumerate() if t.name == ra.HELPER)
    assert ra.calls_in_flight() == 1
    shut: list = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(1))
    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", auto_init_hook.enable_auto_connect)
    level = logging.getLogger("ray").level
    try:
        ra.shutdown(interrupted=True)
        assert shut == []
        release.set()
        deadline = time.time() + 10
        while ra.calls_in_flight() and time.time() < deadline:
            time.sleep(0.05)
        assert ra.calls_in_flight() == 0
        ra.shutdown(interrupted=True)
        assert shut == [1]
    finally:
        release.set()
        logging.getLogger("ray").setLevel(level)
    helper.join(5)
    # the same count covers a call made off the main thread already (stage 1's replicates run on threads)
    seen: list = []
    t = threading.Thread(target=lambda: seen.append(ra.off_main_thread(ra.calls_in_flight)))
    t.start()
    t.join(5)
    assert seen == [1] and ra.calls_in_flight() == 0


def test_the_console_calls_a_trial_failed_unless_only_its_restored_checkpoint_was_gone(tmp_path, capsys):
    """A resumed sweep whose trials Tune restores from a checkpoint storage no longer has reruns them from the start
    and says so once (run_trials); the per-trial line must not call them failed first. Any other latest error
    (Tune appends each failure to the trial's error file) is a failed line."""
    from types import SimpleNamespace

    from sparsecse.run import ray_adapter as ra

    console = ra.console_callback(3)

    def trial(*failures):
        f = tmp_path / "error.txt"
        f.write_text("".join(f"Failure # {i + 1} (occurred at now)\n{e}\n" for i, e in enumerate(failures)))
        return SimpleNamespace(config={"sparsity": 0.1, "lam": 0.5, "seed": 1}, last_result={"evaluated": 1},
                               error_file=str(f), get_error=lambda: None)

    lost = f"ValueError: the checkpoint at s3://b/x {ra.LOST_CHECKPOINT}."
    console.on_trial_error(0, [], trial(lost))
    assert capsys.readouterr().out == ""
    console.on_trial_error(0, [], trial(lost, "RuntimeError: loss is nan"))
    out = capsys.readouterr().out
    assert out.startswith("[trial 1/3] s0.100_l0.50_seed1: failed (see the report and the trial's log)"), out
    # a point a restored experiment ran twice (ray_adapter.one_per_point) is reported done once
    done = SimpleNamespace(config={"sparsity": 0.3, "lam": 0.5, "seed": 1}, last_result={"evaluated": 1})
    console.on_trial_complete(0, [], done)
    console.on_trial_complete(0, [], done)
    assert capsys.readouterr().out.splitlines() == ["[trial 2/3] s0.300_l0.50_seed1: done"]


def test_stage1_on_the_local_ray_runs_without_a_preemption_watcher_and_a_cluster_keeps_it(monkeypatch):
    """Ray Train starts a preemption-watcher process per run; on the local Ray a driver started nothing can be
    preempted, so stage 1 turns it off there — unless the user set it — and leaves a cluster's default alone."""
    from sparsecse.run import ray_adapter as ra

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.setattr(ra, "_LOCAL_RAY", __import__("threading").Event())
    assert ra.train_env() == {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}  # joined a cluster
    ra._LOCAL_RAY.set()  # what connect() does after starting a local Ray
    assert ra.train_env()["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in ra.train_env()


def test_local_paths_reach_the_nodes_absolute_since_ray_train_and_tune_move_a_workers_cwd(tmp_path, monkeypatch):
    """A relative --data-dir or model.name meant the driver's folder; Ray Train's and Tune's workers chdir into
    folders of their own, where it names nothing (found when the GPU sweep passed `--data-dir .carry/data` to a
    cluster: the node check passed, stage 1 failed on a missing corpus). Both now travel absolute; a hub name, an
    absolute path and a staged URI travel as given."""
    import dataclasses

    from sparsecse.run.checks import data_dir_for, model_path_for_nodes

    (tmp_path / "data").mkdir()
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.name=my-model"])
    for on_cluster in (True, False):
        assert data_dir_for(cfg, "data", on_cluster) == str(tmp_path / "data")
    assert data_dir_for(cfg, "s3://bucket/staged/", True) == "s3://bucket/staged"
    assert model_path_for_nodes(cfg).model.name == str(tmp_path / "my-model")
    for name in ("bert-base-uncased", "minilm", str(tmp_path / "my-model"), "s3://bucket/model"):
        other = cfg.replace(model=dataclasses.replace(cfg.model, name=name))
        assert model_path_for_nodes(other).model.name == name


def test_a_ray_job_with_a_working_dir_refuses_an_out_inside_the_copy_ray_deletes(tmp_path, monkeypatch, capsys,
                                                                                  data_dir):
    """`ray job submit --working-dir .` runs the driver in Ray's unpacked copy of the folder, deleted after the job:
    a relative --out (or the default runs/<config>) would leave the run there. Refused in one line, exit 2, before
    anything is written; a storage URI or an absolute path elsewhere is fine, as is any path outside a job."""
    import json

    from sparsecse.cli import main
    from sparsecse.run.checks import check_out_outlives_the_job

    job = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    check_out_outlives_the_job("runs/quickstart")  # not a Ray job: a relative path is the user's folder
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    for out in ("runs/quickstart", str(job / "abs"), "."):
        with pytest.raises(SparseCSEError, match="working_dir copy"):
            check_out_outlives_the_job(out)
    for out in ("s3://bucket/run", str(tmp_path / "kept")):
        check_out_outlives_the_job(out)
    config = str(Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml")
    assert main(["sweep", config, "--out", "runs/q", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out runs/q: inside the Ray job's working_dir copy" in err[0]
    assert not (job / "runs").exists()


def test_a_sweep_in_a_process_whose_interrupted_sweep_still_runs_in_ray_is_refused(monkeypatch, tmp_path):
    """A library caller (a notebook) interrupted run_sweep: Tune's fit goes on in its thread. A second run_sweep
    in that process would run a second fit on the same run beside it; refused in one line, nothing written."""
    import threading

    from sparsecse.run import ray_adapter as ra
    from sparsecse.run.sweep import run_sweep

    still = threading.Event()
    monkeypatch.setattr(ra, "_CALLS", {still})
    with pytest.raises(SparseCSEError, match="restart the process"):
        run_sweep("sweeps/quickstart.yaml", out=str(tmp_path / "run"), resume=True)
    assert not (tmp_path / "run").exists()
