"""One way to publish a stage's report: a file in the output dir, a Prefect artifact, an MLflow artifact."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.tracking import Tracker


class StageFailed(Exception):
    """A stage stopped the flow; the message is the one-line reason."""


def publish(stage: str, markdown: str, data: dict, output_dir: str | Path, tracker: Tracker | None) -> Path:
    folder = Path(output_dir) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    md_path, json_path = folder / f"{stage}.md", folder / f"{stage}.json"
    md_path.write_text(f"# {stage}\n\n{markdown}", encoding="utf-8")
    json_path.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
    create_markdown_artifact(markdown=f"# {stage}\n\n{markdown}", key=f"fidel-{stage}", description=f"fidel {stage}")
    if tracker is not None:
        tracker.log_artifact(md_path, "reports")
        tracker.log_artifact(json_path, "reports")
    return md_path


def logger():
    return get_run_logger()
