"""One way to publish a stage's report: a file in the output dir, a Prefect artifact, an MLflow artifact."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError

from tasks.tracking import Tracker

CURVES = {"text loss": ("train_text_loss", "val_text_loss"), "mel loss": ("train_mel_loss", "val_mel_loss"),
          "mel top-1": ("train_mel_top1", "val_mel_top1")}


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
