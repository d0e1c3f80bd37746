"""One way to publish a stage's report: a file in the output dir, a Prefect artifact, an MLflow artifact."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from fidel_tts.tasks.tracking import Tracker
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.markdown import escape
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError
from prefect.states import Crashed, Failed

CURVES = {"text loss": ("train_text_loss", "val_text_loss"), "mel loss": ("train_mel_loss", "val_mel_loss"),
          "mel top-1": ("train_mel_top1", "val_mel_top1")}


class StageFailed(Exception):
    """A stage stopped the flow; the message is the one-line reason."""


class Preempted(StageFailed):
    """Training stopped on a signal after saving; running the flow again resumes it."""


def one_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def failed_state(exc: Exception):
    """The flow run's final state for a fidel failure, the one-line reason as its message: Crashed for a
    preemption (the infrastructure stopped it; the resume schedule continues it), Failed otherwise. A direct call
    of the flow still raises exc."""
    logger().error(one_line(exc))
    ending = Crashed if isinstance(exc, Preempted) else Failed
    return ending(message=one_line(exc), data=exc)


class OneLineFailures(logging.Filter):
    """Prefect logs a failed task's or flow's exception with its traceback; for fidel's own failures (bad input,
    a stage that stopped the run) the one-line reason is the whole story, in the UI and in a worker's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FidelError | StageFailed):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(OneLineFailures())


def lineage_key(output_dir: str | Path) -> str:
    """The lineage's part of Prefect artifact keys (lowercase letters, digits, dashes): the output dir's name and
    a hash of its path, so two lineages never share an artifact's history."""
    path = Path(output_dir).resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", path.name.lower()).strip("-")[:40] or "run"
    return f"{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def publish(stage: str, markdown: str, data: dict, output_dir: str | Path, tracker: Tracker | None,
            details: str = "") -> Path:
    """A narrow summary as the artifact `<lineage>-<stage>`; long text (reasons, evidence) as
    `<lineage>-<stage>-details`. The report file and MLflow get both."""
    folder = Path(output_dir) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    md_path, json_path = folder / f"{stage}.md", folder / f"{stage}.json"
    title = f"# {stage}: {escape(Path(output_dir).name)}\n\n"
    md_path.write_text(title + markdown + (f"\n## details\n\n{details}" if details else ""), encoding="utf-8")
    json_path.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
    key = f"{lineage_key(output_dir)}-{stage}"
    create_markdown_artifact(markdown=title + markdown, key=key, description=f"fidel {stage} of {output_dir}")
    if details:
        create_markdown_artifact(markdown=f"# {stage} details: {escape(Path(output_dir).name)}\n\n{details}",
                                 key=f"{key}-details", description=f"fidel {stage} details of {output_dir}")
    if tracker is not None:
        tracker.log_artifact(md_path, "reports")
        tracker.log_artifact(json_path, "reports")
    return md_path


def plot_curves(histories: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> Path | None:
    """One panel per curve pair (train and validation) against the optimizer step; None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, keys) for name, keys in CURVES.items() if any(histories.get(k) for k in keys)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = histories.get(key) or []
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 40 else None,
                        label=key.split("_")[0])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def publish_loss_curves(tracker: Tracker, output_dir: str | Path) -> Path | None:
    """The lineage's whole curves, read back from the MLflow run (all attempts), as reports/loss_curves.png."""
    keys = [k for pair in CURVES.values() for k in pair]
    histories = {k: tracker.metric_history(k) for k in keys}
    path = plot_curves(histories, Path(output_dir) / "reports" / "loss_curves.png", title=Path(output_dir).name)
    if path is not None:
        tracker.log_artifact(path, "plots")
    return path


def logger():
    """The run's Prefect logger; a plain logger when called outside a flow or task (hooks driven directly)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fidel")
