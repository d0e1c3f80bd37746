"""Stage 5: export the model, then the evaluation gates that stop a run which isn't learning."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.report import StageFailed, logger, publish
from tasks.spec import RunSpec
from tasks.tracking import Tracker
from trainer.export import export_model, read_export_record
from trainer.gates import (
    all_passed,
    exported_base_rows_identical,
    finite,
    first_failure,
    not_diverging,
    report_markdown,
    validation_improves,
)
from trainer.train import TrainResult


@task(name="evaluation-gates", cache_policy=NO_CACHE)
def evaluation_gates(spec: RunSpec, result: TrainResult, tracker: Tracker | None) -> dict:
    export_dir = Path(spec.output_dir) / "export" / f"step{result.step:08d}"
    exported = read_export_record(export_dir) or export_model(result.checkpoint, export_dir).record
    history = result.val_history
    start, end = history[0], history[-1]
    losses = {**{k: v for k, v in result.last_train.items() if k.endswith("_loss")},
              **{k: v for k, v in end.items() if k.endswith("_loss")}}
    tc = spec.train_config()
    val_total = [h["val_text_loss"] * tc.text_loss_weight + h["val_mel_loss"] * tc.mel_loss_weight for h in history]
    results = [
        exported_base_rows_identical(spec.base_checkpoint, export_dir / "gpt.pth", result.lineage["base_rows"]),
        finite(losses),
        not_diverging(val_total),
        validation_improves(start["val_mel_loss"], end["val_mel_loss"], name="validation_improves_mel"),
        validation_improves(start["val_text_loss"], end["val_text_loss"], name="validation_improves_text"),
    ]
    publish("gates", report_markdown(results), {"gates": [r.to_dict() for r in results], "export": exported},
            spec.output_dir, tracker)
    for r in results:
        logger().info(r.line())
    if tracker is not None:
        tracker.set_tags({f"gate.{r.name}": "PASS" if r.passed else "FAIL" for r in results})
        tracker.set_tags({"gates": "PASS" if all_passed(results) else "FAIL", "export.dir": str(export_dir)})
    if not all_passed(results):
        raise StageFailed(first_failure(results))
    if tracker is not None:
        tracker.log_artifact(export_dir, "export")
    return {"gates": [r.to_dict() for r in results], "export_dir": str(export_dir), "export": exported}
