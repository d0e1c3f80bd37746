"""MLflow for fidel: one run per lineage, reopened on resume; metrics by step, never a step twice.

The store is embedded: `sqlite:///mlruns/mlflow.db`, artifacts under `mlruns/artifacts`. MLflow 3.13+
refuses a plain ./mlruns file store, and a stray MLFLOW_RUN_ID in the environment would silently turn a
new run into a resume, so it is removed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "fidel"
RUN_FILE = "mlflow_run.json"


def artifact_root_for(tracking_uri: str) -> str:
    """Artifacts beside the sqlite file: sqlite:///mlruns/mlflow.db → file:///abs/mlruns/artifacts."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent.resolve() / "artifacts").as_uri()
    return (Path("mlruns").resolve() / "artifacts").as_uri()


def ensure_store(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


@dataclass
class Tracker:
    """A handle on one MLflow run, logging through MlflowClient with explicit run ids (no global state)."""

    tracking_uri: str
    run_id: str
    experiment_id: str
    resumed: bool

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_metric_rows(self, rows: list[tuple[int, dict]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, values in rows for k, v in values.items()
                   if isinstance(v, int | float)]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def url(self) -> str:
        return f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def open_run(output_dir: str | Path, tracking_uri: str = DEFAULT_TRACKING_URI,
             experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None) -> Tracker:
    """The lineage's run: reopened from output_dir/mlflow_run.json when it exists, else created and recorded."""
    from mlflow import MlflowClient

    os.environ.pop("MLFLOW_RUN_ID", None)
    ensure_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    record = Path(output_dir) / RUN_FILE
    if record.is_file():
        saved = json.loads(record.read_text())
        run = client.get_run(saved["run_id"])
        if run.info.status != "RUNNING":
            client.update_run(saved["run_id"], status="RUNNING")
        return Tracker(tracking_uri, saved["run_id"], run.info.experiment_id, resumed=True)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_root_for(
        tracking_uri))
    run = client.create_run(exp_id, run_name=run_name or Path(output_dir).name)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": tracking_uri}))
    return Tracker(tracking_uri, run.info.run_id, exp_id, resumed=False)
