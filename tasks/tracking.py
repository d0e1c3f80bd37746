"""MLflow for fidel: one run per lineage, reopened on resume; metrics by step, never a step twice.

The store is embedded: `sqlite:///mlruns/mlflow.db`, artifacts under `mlruns/artifacts`. MLflow 3.13+
refuses a plain ./mlruns file store, and a stray MLFLOW_RUN_ID in the environment would silently turn a
new run into a resume, so it is removed. Everything logs through MlflowClient with explicit run ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.training.checkpoint import list_checkpoints, read_sidecar

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "fidel"
RUN_FILE = "mlflow_run.json"
CANDIDATE_ALIAS = "candidate"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the experiment page's training layout
DIGEST_CHARS = 16  # of a sha256: MLflow keeps at most 36 characters of a dataset digest
EXPORT_MODEL_TAG = "export.model_id"


def run_page(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI. workflowType picks the model-training layout: the UI otherwise opens in the
    GenAI layout (its default, kept per browser), whatever the experiment's kind tag says."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


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
        """Params are logged once per lineage: keys the run already has are left as they are."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def set_tags(self, tags: dict, wait: bool = True) -> None:
        """wait=False queues the write on MLflow's async logging thread (the training loop's hooks); flush()."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()],
                              synchronous=wait)

    def flush(self) -> None:
        """Wait until every queued (wait=False) write has reached the store.

        The queue belongs to the store of this tracking URI (one per URI and process); mlflow.flush_async_logging
        would flush only the fluent API's default store, so the client's store is flushed (mlflow 3.17)."""
        self.client._tracking_client.store.flush_async_logging()

    def tags(self) -> dict:
        self.flush()  # reads see what was queued
        return self.client.get_run(self.run_id).data.tags

    def logged_steps(self) -> dict[str, int]:
        """The highest step logged so far for each metric."""
        self.flush()
        client = self.client
        keys = client.get_run(self.run_id).data.metrics
        return {k: max(m.step for m in client.get_metric_history(self.run_id, k)) for k in keys}

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        self.flush()
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)

    def url(self) -> str | None:
        """The run's page when the tracking URI is a server; None for a local store (see how_to_view)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        return run_page(self.tracking_uri.rstrip("/"), self.experiment_id, self.run_id)

    def how_to_view(self) -> str:
        """One line that takes a user to the run: its URL, or the `mlflow ui` command and the page to open."""
        if url := self.url():
            return f"MLflow run {self.run_id}: {url}"
        return (f"MLflow run {self.run_id}: mlflow ui --backend-store-uri {self.tracking_uri} --port 5000, then open "
                + run_page("http://127.0.0.1:5000", self.experiment_id, self.run_id))

    def describe(self, text: str) -> None:
        """The run's description in the MLflow UI (markdown)."""
        self.set_tags({"mlflow.note.content": text})

    def log_dataset(self, name: str, digest: str, context: str, source: str, profile: dict) -> None:
        """A dataset as a run input (the UI's Datasets), identified by its content hash and used as `context`."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = Dataset(name=name, digest=digest[:DIGEST_CHARS], source_type="local",
                          source=json.dumps({"uri": source}), profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])


class MetricLog:
    """Commits metric rows to the run, never logging a (metric, step) that the run already holds.

    The trainer commits rows only with the checkpoint that contains them, so a resume does not repeat steps;
    this guard also covers the paths around it (rows committed on failure, a resume from an older checkpoint)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.last = tracker.logged_steps()

    def high_water(self, prefixes: tuple[str, ...] = ("train_", "val_")) -> int | None:
        steps = [s for k, s in self.last.items() if k.startswith(prefixes)]
        return max(steps) if steps else None

    def commit(self, rows: list[tuple[int, dict]]) -> int:
        """Queue the rows' numeric values on MLflow's async logging thread, so the training loop does not wait on
        the store (Tracker.flush waits); returns how many (metric, step) points were skipped as already logged.
        A kill can lose what is still queued: at most the newest checkpoint's rows, which a resume replays."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics, skipped = [], 0
        for step, values in rows:
            for key, value in values.items():
                if not isinstance(value, int | float) or isinstance(value, bool):
                    continue
                if step <= self.last.get(key, -1):
                    skipped += 1
                    continue
                metrics.append(Metric(key, float(value), now, step))
                self.last[key] = step
        for i in range(0, len(metrics), 900):
            self.tracker.client.log_batch(self.tracker.run_id, metrics=metrics[i:i + 900], synchronous=False)
        return skipped


def start_system_metrics(tracker: Tracker, interval_s: float = 10.0):
    """CPU, memory, disk, network (psutil) and GPU (pynvml, where installed) as system/* metrics.

    resume_logging continues the step count after the run's last system step, so a resume adds no duplicates.
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides the interval. Returns the monitor; call .finish()."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s, resume_logging=True,
                                   tracking_uri=tracker.tracking_uri)
    monitor.start()
    return monitor


def flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def run_id_from_checkpoints(output_dir: Path) -> str | None:
    """The lineage's run id as its newest checkpoint recorded it (when mlflow_run.json was lost)."""
    for path in list_checkpoints(output_dir):
        try:
            run_id = read_sidecar(path).get("mlflow_run_id")
        except FidelError:
            continue
        if run_id:
            return run_id
    return None


def open_run(output_dir: str | Path, tracking_uri: str = DEFAULT_TRACKING_URI,
             experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None) -> Tracker:
    """The lineage's run: reopened from output_dir/mlflow_run.json (or its checkpoints' sidecars), else created."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    os.environ.pop("MLFLOW_RUN_ID", None)
    ensure_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    output_dir = Path(output_dir)
    record = output_dir / RUN_FILE
    run_id = json.loads(record.read_text())["run_id"] if record.is_file() else run_id_from_checkpoints(output_dir)
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise FidelError(record, f"MLflow run {run_id} of this lineage is not in {tracking_uri} "
                                     "(tracking_uri changed?)") from exc
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        if not record.is_file():
            write_run_record(record, run_id, run.info.experiment_id, tracking_uri)
        return Tracker(tracking_uri, run_id, run.info.experiment_id, resumed=True)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_root_for(
        tracking_uri))
    if EXPERIMENT_KIND[0] not in (exp.tags if exp else {}):
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    run = client.create_run(exp_id, run_name=run_name or output_dir.name)
    write_run_record(record, run.info.run_id, exp_id, tracking_uri)
    return Tracker(tracking_uri, run.info.run_id, exp_id, resumed=False)


def write_run_record(record: Path, run_id: str, experiment_id: str, tracking_uri: str) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri}))


def log_export_model(tracker: Tracker, export_dir: Path, name: str, step: int, metrics: dict[str, float]) -> str:
    """The export as an MLflow LoggedModel of the run, its final metrics linked to it; returns its model id.

    Once per lineage: a re-run after a crash finds the READY model by the run's tag and reuses it."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    client = tracker.client
    model_id = tracker.tags().get(EXPORT_MODEL_TAG)
    if model_id and client.get_logged_model(model_id).status == LoggedModelStatus.READY:
        return model_id
    model = client.create_logged_model(tracker.experiment_id, name=name, source_run_id=tracker.run_id,
                                       model_type="indextts2-gpt", tags={"export.dir": str(export_dir)})
    client.log_model_artifacts(model.model_id, str(export_dir))
    now = int(time.time() * 1000)
    client.log_batch(tracker.run_id, metrics=[Metric(f"final_{k}", float(v), now, step, model_id=model.model_id)
                                              for k, v in metrics.items()])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(tracker.run_id, [LoggedModelOutput(model.model_id, step)])
    tracker.set_tags({EXPORT_MODEL_TAG: model.model_id})
    return model.model_id


def register_export(tracker: Tracker, name: str, model_id: str, alias: str = CANDIDATE_ALIAS) -> str:
    """Register the run's logged export model as a version of `name` (once per run) and point `alias` at it."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.create_registered_model(name, description="fidel fine-tunes (upstream gpt.pth, bpe.model, config)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    versions = client.search_model_versions(f"name='{name}' and run_id='{tracker.run_id}'")
    if versions:
        version = str(max(int(v.version) for v in versions))
    else:
        source = client.get_logged_model(model_id).artifact_location  # models:/ would resolve in the default store
        version = str(client.create_model_version(name, source, run_id=tracker.run_id, model_id=model_id).version)
    client.set_registered_model_alias(name, alias, version)
    return version


def git_commit(folder: Path | None = None) -> str:
    """The fidel source commit (with '-dirty' for uncommitted changes), or 'unknown' outside a git checkout."""
    folder = folder or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")

