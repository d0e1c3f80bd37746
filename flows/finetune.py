"""The fine-tune flow: data checks → tokenizer verification → checkpoint triage → training → gates.

Idempotent by design: a scheduled deployment re-runs it, and it resumes from the newest valid checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.data import data_checks
from tasks.gates import evaluation_gates
from tasks.spec import load_run_spec, run_spec_from_dict
from tasks.tokenizer import tokenizer_verification
from tasks.tracking import open_run
from tasks.train import training
from tasks.triage import checkpoint_triage


class Preempted(Exception):
    """Training stopped on a signal after saving; running the flow again resumes it."""


@flow(name="fidel-finetune")
def finetune(run_config: str | None = None, settings: dict | None = None, show_progress: bool = False) -> dict:
    spec = load_run_spec(run_config) if run_config else run_spec_from_dict(settings or {}, Path.cwd() / "run.yaml")
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    tracker = open_run(spec.output_dir, spec.tracking_uri, spec.experiment, spec.run_name)
    try:
        data = data_checks(spec, tracker)
        tokenizer_verification(spec, data["texts"], tracker)
        decision = checkpoint_triage(spec, tracker)
        result = training(spec, data["data_dir"], decision, tracker, show_progress)
        if result.status == "preempted":
            raise Preempted(f"preempted at step {result.step}/{result.total_steps}, resumable: {result.reason}")
        gates = evaluation_gates(spec, result, tracker)
    except Preempted:
        tracker.set_tags({"status": "preempted"})
        tracker.finish("KILLED")
        raise
    except Exception as exc:
        tracker.set_tags({"status": "failed", "failed.reason": str(exc)[:4000]})
        tracker.finish("FAILED")
        raise
    tracker.set_tags({"status": "completed"})
    tracker.finish("FINISHED")
    return {"status": "completed", "mlflow_run_id": tracker.run_id, "experiment_id": tracker.experiment_id,
            "tracking_uri": spec.tracking_uri, "output_dir": spec.output_dir, "step": result.step,
            "val_history": result.val_history, "last_train": result.last_train, **gates}

