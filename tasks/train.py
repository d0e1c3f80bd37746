"""Stage 4: fresh-or-resume training, metrics committed to MLflow with each checkpoint."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from tasks.report import StageFailed, logger
from tasks.spec import RunSpec
from tasks.tracking import Tracker
from trainer.train import TrainHooks, TrainResult, train


def progress_hooks(tracker: Tracker | None, show_progress: bool) -> tuple[TrainHooks, list]:
    bar_holder: list = []

    def on_start(info: dict) -> None:
        if tracker is not None:
            tracker.set_tags({"lineage.id": info["lineage"]["id"], "device": info["device"], "amp": info["amp"],
                              "resumed_from": info["resumed_from"] if info["resumed_from"] is not None else "none"})
            tracker.log_params({"lineage": {k: v for k, v in info["lineage"].items() if k != "mlflow_run_id"},
                                "trainable_params": info["trainable_params"], "total_steps": info["total_steps"]})
        if show_progress:
            start = info["resumed_from"] or 0
            bar_holder.append(tqdm(total=info["total_steps"], initial=start, desc="training", unit="step"))

    def on_progress(step: int, total: int, metrics: dict) -> None:
        if bar_holder:
            bar = bar_holder[0]
            bar.update(step - bar.n)
            bar.set_postfix(text=f"{metrics['train_text_loss']:.3f}", mel=f"{metrics['train_mel_loss']:.3f}")

    def on_commit(rows: list) -> None:
        if tracker is not None and rows:
            tracker.log_metric_rows(rows)

    def on_checkpoint(path: Path, sidecar: dict) -> None:
        if tracker is not None:
            tracker.set_tags({"checkpoint.latest": str(path), "checkpoint.step": sidecar["step"]})

    return TrainHooks(on_start=on_start, on_commit=on_commit, on_checkpoint=on_checkpoint,
                      on_progress=on_progress), bar_holder


@task(name="training", cache_policy=NO_CACHE)
def training(spec: RunSpec, data_dir: str, decision: dict, tracker: Tracker | None,
             show_progress: bool = False) -> TrainResult:
    tc = spec.train_config(Path(data_dir), tracker.run_id if tracker else None)
    tc.resume = decision["checkpoint"] if decision["action"] == "resume" else None
    if tracker is not None and not tracker.resumed:
        tracker.log_params({"train": {k: v for k, v in tc.to_dict().items() if k not in ("resume", "mlflow_run_id")}})
    hooks, bars = progress_hooks(tracker, show_progress)
    try:
        result = train(tc, hooks)
    finally:
        for bar in bars:
            bar.close()
    logger().info("training %s at step %d/%d %s", result.status, result.step, result.total_steps, result.reason)
    if tracker is not None:
        tracker.set_tags({"train.status": result.status})
    if result.status == "failed":
        raise StageFailed(f"training failed: {result.reason}")
    return result
