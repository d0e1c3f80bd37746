"""The state of a lineage in its output dir: finished or not, and how often it was resumed (crash-loop guard).

A scheduled deployment re-runs the flow every few minutes, so the flow must tell "done", "resume it" and
"this keeps dying" apart from the files alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from fidel_tts.tasks.report import StageFailed, lineage_key
from fidel_tts.tasks.tracking import RUN_FILE, Tracker
from fidel_tts.trainer.checkpoints.export import read_export_record
from fidel_tts.trainer.files import atomic_write_json
from fidel_tts.trainer.markdown import escape
from fidel_tts.trainer.training.checkpoint import list_checkpoints
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL

FINISHED_FILE = "finished.json"
ATTEMPTS_FILE = "resume_attempts.json"


class CrashLoop(StageFailed):
    """The lineage was resumed too often in too little time: something kills it on every try."""


def started(output_dir: Path) -> bool:
    """A lineage began here: its MLflow run was opened or a checkpoint was written."""
    return (output_dir / RUN_FILE).is_file() or bool(list_checkpoints(output_dir))


def read_finished(output_dir: Path) -> dict | None:
    """The final record when the lineage finished and its export is still there; else None."""
    path = output_dir / FINISHED_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if read_export_record(record.get("export_dir", "")) is None:
        return None  # the export was removed: run the gates (and export) again
    return record


def write_finished(output_dir: Path, record: dict) -> None:
    atomic_write_json(output_dir / FINISHED_FILE, record)


@dataclass
class Attempt:
    at: float
    flow_run_id: str | None
    pid: int
    host: str


def read_attempts(output_dir: Path) -> list[Attempt]:
    path = output_dir / ATTEMPTS_FILE
    if not path.is_file():
        return []
    return [Attempt(**a) for a in json.loads(path.read_text(encoding="utf-8"))["attempts"]]


def recent(attempts: list[Attempt], now: float, window_minutes: float) -> list[Attempt]:
    return [a for a in attempts if now - a.at <= window_minutes * 60]


def record_attempt(output_dir: Path, attempt: Attempt, max_attempts: int, window_minutes: float) -> int:
    """Count one more resume of this lineage; refuse (CrashLoop) the one past max_attempts in the window.

    Returns the lineage's resume count including this attempt."""
    attempts = read_attempts(output_dir)
    within = recent(attempts, attempt.at, window_minutes)
    if len(within) >= max_attempts:
        first = time.strftime("%H:%M:%S", time.localtime(within[0].at))
        raise CrashLoop(f"crash loop: {len(within)} resume attempts of this lineage in the last {window_minutes:g} "
                        f"min (first at {first}, limit {max_attempts}); not resuming again. Inspect "
                        f"{output_dir}/reports and the last flow runs' logs, then delete {ATTEMPTS_FILE} there "
                        "(or raise max_resume_attempts) to try again")
    attempts.append(attempt)
    atomic_write_json(output_dir / ATTEMPTS_FILE, {"attempts": [vars(a) for a in attempts]})
    return len(attempts)


def link_runs(tracker: Tracker, output_dir: Path, log) -> None:
    """Each UI names the other: a Prefect link (or markdown) artifact and a log line with the MLflow run, and the
    Prefect flow run's URL on the MLflow run when PREFECT_API_URL points at a server."""
    log.info(tracker.how_to_view())
    key = f"{lineage_key(output_dir)}-mlflow"
    if url := tracker.url():
        create_link_artifact(url, link_text=f"MLflow run {tracker.run_id}", key=key,
                             description=f"the MLflow run of {output_dir}")
    else:
        create_markdown_artifact(f"# MLflow run\n\n{escape(tracker.how_to_view())}\n", key=key,
                                 description=f"the MLflow run of {output_dir} (local store: no server URL)")
    if PREFECT_API_URL.value() and flow_run.id:
        tracker.set_tags({"prefect.flow_run_url": flow_run.ui_url})


DESCRIBED = (("output_dir", "output dir"), ("data.sha256", "data content"), ("data.train.kept", "train pairs"),
             ("data.val.kept", "validation pairs"), ("triage.decision", "triage"), ("triage.verdict", "triage said"),
             ("train.step", "steps"), ("resume.count", "resumes"), ("gates", "gates"),
             ("gates.advisory", "advisory gates"), ("gates.failed", "failed gate"), ("failed.reason", "failure"),
             ("registered_model", "registered"), ("prefect.flow_run_url", "Prefect flow run"))


def describe_run(tracker: Tracker, status: str) -> None:
    """The run's description in the MLflow UI: the lineage's story (data, triage, steps, gates) from its tags."""
    tags = tracker.tags()
    lines = [f"**fidel lineage {escape(Path(tags.get('output_dir', '')).name)}: {escape(status)}**", ""]
    lines += [f"- {label}: {escape(tags[key])}" for key, label in DESCRIBED if tags.get(key)]
    tracker.describe("\n".join(lines) + "\n")
