"""Experiment tracking (sweep.loggers): what the driver logs to MLflow and W&B — stage 1 with its dev curve, the
sweep's outcome with the report, figures and export as artifacts — into the run's own stores by default, and
into cloud storage for a cloud run. The trials' Tune callbacks are exercised by the Optuna sweep in test_ray.py."""

from __future__ import annotations

import pytest

from sparsecse import SparseCSEError
from sparsecse.core.config import load_config
from sparsecse.core.storage import Storage
from sparsecse.run.tracking import Tracking

HISTORY = [{"step": 2, "loss": 0.5, "stsb_dev": 70.0, "best_stsb_dev": 70.0, "last": False},
           {"step": 4, "loss": 0.25, "stsb_dev": 71.5, "best_stsb_dev": 71.5}]
SUMMARY = {"selected": {"sparsity": 0.3, "lam": 0.5, "dev_mean": 71.5, "params": 700,
                        "test": {"STSBenchmark": 69.0, "avg": 68.0}},
           "baseline": {"STSBenchmark": 68.0, "avg": 67.0, "align": 0.2}}


def _log_a_sweep(store: Storage, loggers: str) -> Tracking:
    cfg = load_config(None, [f"sweep.loggers={loggers}", "sweep.seeds=[1]"])
    store.write_json("export/manifest.json", {"files": {}})
    tr = Tracking(cfg, store)
    tr.log_stage1(HISTORY)
    tr.log_outcome(SUMMARY, {"report.md": b"# report\n", "figures/a.png": b"\x89PNG"}, "export")
    return tr


def _mlflow_runs(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = {r.data.tags["sparsecse.stage"]: r for r in client.search_runs([exp.experiment_id])}
    return client, runs


def test_mlflow_store_in_the_run_has_stage1_and_the_outcome_with_artifacts(tmp_path):
    run_dir = tmp_path / "myrun"
    tr = _log_a_sweep(Storage(run_dir), "[tensorboard, mlflow]")
    assert tr.name.startswith("myrun-")  # the run's name and a hash of its whole URI
    db = run_dir / "mlflow" / "mlflow.db"
    assert db.is_file()  # `mlflow ui --backend-store-uri sqlite:///…/mlflow.db` browses it offline
    client, runs = _mlflow_runs(f"sqlite:///{db}", tr.name)
    assert set(runs) == {"stage1", "outcome"}
    s1 = runs["stage1"]
    assert s1.data.params["train.lr"] == "3e-05" and s1.info.status == "FINISHED"
    curve = client.get_metric_history(s1.info.run_id, "stsb_dev")
    assert [(m.step, m.value) for m in curve] == [(2, 70.0), (4, 71.5)]
    out = runs["outcome"]
    assert out.data.metrics["selected/sparsity"] == 0.3 and out.data.metrics["selected/encoder_params"] == 700
    assert out.data.metrics["selected/test/avg"] == 68.0 and "baseline/test/align" in out.data.metrics
    arts = {a.path for a in client.list_artifacts(out.info.run_id)}
    assert {"report.md", "figures", "export"} <= arts
    assert (run_dir / "mlflow" / "artifacts").is_dir()  # artifacts live in the run too, not in ./mlruns
    # a resumed sweep logs a stage again: it replaces its earlier run instead of adding a second one
    _log_a_sweep(Storage(run_dir), "[mlflow]")
    client, runs = _mlflow_runs(f"sqlite:///{db}", tr.name)
    assert len(client.search_runs([client.get_experiment_by_name(tr.name).experiment_id])) == 2


def test_two_sweeps_on_one_tracking_server_keep_each_others_runs(tmp_path):
    """Two runs whose --out end in the same name, logging to one shared MLflow server: each has its own experiment
    (named from the whole URI), and a resumed sweep replaces only the runs it created itself (by id) — also when
    both are told to share an experiment (sweep.experiment)."""
    from mlflow.tracking import MlflowClient

    server = f"sqlite:///{tmp_path / 'team.db'}"
    a, b = Storage(tmp_path / "a" / "run"), Storage(tmp_path / "b" / "run")
    client = MlflowClient(server)
    own = ["sweep.loggers=[mlflow]", f"sweep.mlflow_tracking_uri={server}"]
    for st in (a, b, a):  # a logs, b logs, a resumes and logs again
        Tracking(load_config(None, own), st).log_stage1(HISTORY)
    names = {Tracking(load_config(None, own), st).name for st in (a, b)}
    assert len(names) == 2 and all(n.startswith("run-") for n in names)
    for n in names:
        assert len(client.search_runs([client.get_experiment_by_name(n).experiment_id])) == 1
    shared = ["sweep.loggers=[mlflow]", f"sweep.mlflow_tracking_uri={server}", "sweep.experiment=team"]
    for st in (a, b):
        Tracking(load_config(None, shared), st).log_stage1(HISTORY)
    Tracking(load_config(None, shared), a).log_stage1(HISTORY)  # a resumes and logs its stage 1 again
    runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    assert sorted(r.data.tags["sparsecse.run"] for r in runs) == sorted([a.uri, b.uri])  # b's run survived


def test_wandb_offline_runs_are_written_under_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "wrun"
    _log_a_sweep(Storage(run_dir), "[wandb]")
    offline = sorted((run_dir / "wandb").rglob("offline-run-*"))
    assert len([p for p in offline if p.is_dir()]) == 2  # stage 1 and the outcome
    assert any(p.suffix == ".wandb" for d in offline for p in d.iterdir())


def test_a_cloud_run_gets_the_drivers_tracking_store(tmp_path, s3, monkeypatch):
    from conftest import s3_keys

    monkeypatch.setenv("SPARSECSE_CACHE", str(tmp_path / "cache"))
    _log_a_sweep(Storage(f"s3://{s3.bucket}/trk/run1"), "[mlflow]")
    keys = s3_keys("trk/run1/mlflow/")
    assert "trk/run1/mlflow/mlflow.db" in keys and any("/report.md" in k for k in keys)


def test_tracking_config_errors_are_one_line(tmp_path):
    with pytest.raises(SparseCSEError, match="sweep.loggers"):
        load_config(None, ["sweep.loggers=[mlflow, mlflow]"])
    with pytest.raises(SparseCSEError, match="sweep.loggers"):
        load_config(None, ["sweep.loggers=[comet]"])
    bad = load_config(None, ["sweep.loggers=[mlflow]", "sweep.mlflow_tracking_uri=postgresql://nobody@127.0.0.1:9/x"])
    with pytest.raises(SparseCSEError, match="sweep.mlflow_tracking_uri: cannot open MLflow"):
        Tracking(bad, Storage(tmp_path / "r"))
