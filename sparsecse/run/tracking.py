"""Experiment tracking beside TensorBoard (`sweep.loggers`): MLflow and Weights & Biases.

Every trial goes through Ray Tune's own logger callbacks (MLflowLoggerCallback, WandbLoggerCallback; ray_adapter
builds them from `logger_settings()`, and they run in the driver). The driver logs stage 1 (its config and dev
curve) and the sweep's outcome (the selection, report.md/html, figures, results.parquet and the exported model)
into the same MLflow experiment / W&B group: sweep.experiment, else named after the run (its last path segment and
a hash of its whole URI). On a shared tracking server a sweep deletes only runs it created itself (their ids are in
the run's mlflow_runs.json), never by a tag or name another sweep may share.

Where it goes by default, so that it works offline:
  MLflow  a sqlite store and its artifacts in the run, mlflow/mlflow.db and mlflow/artifacts/
          (browse: `mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db`); sweep.mlflow_tracking_uri or
          MLFLOW_TRACKING_URI point it at a team's server instead.
  W&B     the W&B project sweep.wandb_project; WANDB_MODE=offline writes the runs under wandb/ in the run
          (`wandb sync RUN/wandb/offline-run-*` uploads them later).
With cloud storage (--out s3://…) both are kept on the driver while the sweep runs and copied into the run after
stage 1, after the trials and at the end; a resumed driver continues the same sqlite store.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path

from .. import SparseCSEError
from ..core.config import Config
from ..core.results import DEV, LAST_DEV
from ..core.storage import Storage, cache_root, scratch_dir

TRACKERS = ("mlflow", "wandb")
RUN_IDS = "mlflow_runs.json"  # in the run: {stage: MLflow run id} of the runs this sweep created


def experiment_name(uri: str) -> str:
    """The default MLflow experiment / W&B group of a run: its last path segment (readable) and a hash of the
    whole URI, so two runs whose --out end in the same name never share an experiment."""
    return f"{Path(uri.rstrip('/')).name}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracking:
    """The run's trackers: `logger_settings()` for the Tune trials, `log_stage1` and `log_outcome` from the driver."""

    def __init__(self, cfg: Config, store: Storage):
        self.cfg, self.store = cfg, store
        self.on = [t for t in cfg.sweep.loggers if t in TRACKERS]
        self.name = cfg.sweep.experiment or experiment_name(store.uri)
        if store.is_local:
            self.local = Path(store.root)
        else:  # the driver's copy of a cloud run's tracking files
            key = hashlib.sha1(store.uri.encode()).hexdigest()[:12]
            self.local = cache_root() / "tracking" / key
        self._mlflow_uri = None
        if "mlflow" in self.on:
            self._mlflow_uri = self._setup_mlflow()
        if "wandb" in self.on:
            self._check_wandb()

    # ------------------------------------------------------------------ MLflow
    def _setup_mlflow(self) -> str:
        if importlib.util.find_spec("mlflow") is None:
            raise SparseCSEError("config sweep.loggers: mlflow is not installed; pip install 'sparsecse[tracking]' "
                                 "or remove mlflow from sweep.loggers")
        uri = self.cfg.sweep.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            if not self.store.is_local and not (self.local / "mlflow").exists() and self.store.is_dir("mlflow"):
                self.store.download_dir("mlflow", self.local / "mlflow")  # a resumed driver keeps one store
            (self.local / "mlflow").mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(self.local / 'mlflow' / 'mlflow.db').as_posix()}"
            artifacts = (self.local / "mlflow" / "artifacts").as_uri()
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(uri)
            if client.get_experiment_by_name(self.name) is None:
                client.create_experiment(self.name, artifact_location=artifacts)
        except Exception as e:  # noqa: BLE001 - any store/server failure, reported in one line
            raise SparseCSEError(f"config sweep.mlflow_tracking_uri: cannot open MLflow at {uri} "
                                 f"({str(e).splitlines()[0][:200]}); fix the URI or unset it for the run's own store") from None
        return uri

    def _mlflow_run(self, run_name: str, stage: str, params: dict, metrics: list[tuple[str, float, int]],
                    artifacts: Path | None = None) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self._mlflow_uri)
        exp = client.get_experiment_by_name(self.name)
        mine = self.store.read_json(RUN_IDS) if self.store.is_file(RUN_IDS) else {}
        if mine.get(stage):  # a resumed sweep logs its stage again, once: it deletes the run it created itself,
            try:             # by id — never another sweep's runs that share the experiment or a tag
                client.delete_run(mine[stage])
            except Exception:  # noqa: BLE001 - already deleted on the server: nothing to replace
                pass
        run = client.create_run(exp.experiment_id, run_name=run_name,
                                tags={"sparsecse.stage": stage, "sparsecse.run": self.store.uri})
        self.store.write_json(RUN_IDS, {**mine, stage: run.info.run_id})
        now = int(time.time() * 1000)
        params = [Param(k, str(v)[:6000]) for k, v in params.items()]
        mets = [Metric(k.replace("@", "_"), float(v), now, step) for k, v, step in metrics]
        for i in range(0, max(len(params), len(mets)), 100):  # log_batch takes at most 100 params per call
            client.log_batch(run.info.run_id, metrics=mets[i:i + 100], params=params[i:i + 100])
        if artifacts is not None:
            client.log_artifacts(run.info.run_id, artifacts.as_posix())
        client.set_terminated(run.info.run_id)

    # ------------------------------------------------------------------ W&B
    def _check_wandb(self) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise SparseCSEError("config sweep.loggers: wandb is not installed; pip install 'sparsecse[tracking]' "
                                 "or remove wandb from sweep.loggers")
        (self.local / "wandb").mkdir(parents=True, exist_ok=True)

    def _wandb_init(self) -> dict:
        """wandb.init arguments every run of this sweep shares: one project, one group (the run), files in the run;
        WANDB_MODE (e.g. offline) is passed on explicitly, since Tune's logging actors may not inherit it."""
        kw = {"project": self.cfg.sweep.wandb_project, "group": self.name, "dir": self.local.as_posix()}
        if os.environ.get("WANDB_MODE"):
            kw["mode"] = os.environ["WANDB_MODE"]
        return kw

    def _wandb_run(self, run_name: str, stage: str, params: dict, metrics: list[tuple[str, float, int]],
                   artifacts: Path | None = None) -> None:
        import wandb

        run = wandb.init(name=run_name, job_type=stage, config=params, reinit="create_new", **self._wandb_init())
        try:
            for k, v, step in metrics:
                run.log({k: v}, step=step)
            if artifacts is not None:
                art = wandb.Artifact(f"{self.name}-{stage}", type=stage)
                art.add_dir(artifacts.as_posix())
                run.log_artifact(art)
        finally:
            run.finish()

    # ------------------------------------------------------------------ what the sweep calls
    def logger_settings(self) -> dict:
        """{tracker: keyword arguments of Ray Tune's logger callback for it} (ray_adapter builds the callbacks):
        every trial's config, every reported metric, start and end, in the sweep's experiment / group."""
        out = {}
        if "mlflow" in self.on:
            out["mlflow"] = {"tracking_uri": self._mlflow_uri, "experiment_name": self.name,
                             "tags": {"sparsecse.stage": "trial", "sparsecse.run": self.store.uri}}
        if "wandb" in self.on:
            out["wandb"] = {**self._wandb_init(), "job_type": "trial"}
        return out

    def _log(self, run_name: str, stage: str, params: dict, metrics: list, artifacts: Path | None = None) -> None:
        if "mlflow" in self.on:
            self._mlflow_run(run_name, stage, params, metrics, artifacts)
        if "wandb" in self.on:
            self._wandb_run(run_name, stage, params, metrics, artifacts)
        self.sync()

    def log_stage1(self, history: list[dict]) -> None:
        """Stage 1 as one run: the model/data/train config and its dev curve (loss, STS-B dev per evaluation)."""
        if not self.on:
            return
        cd = self.cfg.to_dict()
        params = _flat({k: cd[k] for k in ("model", "data", "train", "ray")})
        metrics = [(k, v, int(h["step"])) for h in history for k, v in h.items()
                   if k in ("loss", LAST_DEV, DEV) and v is not None]
        self._log("stage1 (SimCSE)", "stage1", params, metrics)

    def log_outcome(self, summary: dict, files: dict[str, bytes], export_rel: str | None) -> None:
        """The sweep's outcome as one run: the whole config, the selection's dev/test figures, and as artifacts the
        report, figures, results table and the exported model (`export_rel` in the run, when there is one)."""
        if not self.on:
            return
        sel = summary.get("selected") or {}
        metrics = [(k, v, 0) for k, v in (("selected/sparsity", sel.get("sparsity")), ("selected/lam", sel.get("lam")),
                                          ("selected/stsb_dev", sel.get("dev_mean")),
                                          ("selected/encoder_params", sel.get("params")))
                   if v is not None]
        metrics += [(f"selected/test/{t}", v, 0) for t, v in (sel.get("test") or {}).items()]
        metrics += [(f"baseline/test/{t}", v, 0) for t, v in (summary.get("baseline") or {}).items()
                    if isinstance(v, (int, float))]
        with scratch_dir("tracking") as tmp:
            for rel, data in files.items():
                p = tmp / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
            if export_rel and self.store.is_dir(export_rel):
                self.store.download_dir(export_rel, tmp / "export")
            self._log("sweep outcome", "outcome", _flat(self.cfg.to_dict()), metrics, tmp)

    def sync(self) -> None:
        """A cloud run gets the driver's tracking files (the sqlite store, W&B offline runs): after stage 1, after the
        trials and at the end."""
        if self.store.is_local or not self.on:
            return
        for sub in ("mlflow", "wandb"):
            if (self.local / sub).is_dir():
                self.store.upload_dir(self.local / sub, sub, replace=False)
