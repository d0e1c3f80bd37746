"""Stage 4: fresh-or-resume training, metrics committed to MLflow with each checkpoint, progress to Prefect."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from fidel_tts.tasks.gates import gate_tagger
from fidel_tts.tasks.report import StageFailed, lineage_key, logger, publish_loss_curves
from fidel_tts.tasks.spec import RunSpec
from fidel_tts.tasks.tracking import MetricLog, Tracker
from fidel_tts.trainer.checkpoints.experimental import continue_community
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.evaluation.gates import GateConfig, validation_hook
from fidel_tts.trainer.training.checkpoint import latest_valid_checkpoint, read_sidecar
from fidel_tts.trainer.training.distributed import launch_function
from fidel_tts.trainer.training.hooks import TrainHooks, TrainResult
from fidel_tts.trainer.training.progress import Progress
from fidel_tts.trainer.training.trainer import train
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

PROGRESS_UPDATE_S = 10.0


def progress_hooks(tracker: Tracker | None, show_progress: bool, progress_artifact: str | None = None) -> tuple[
        TrainHooks, list]:
    """progress_artifact: the key of the Prefect progress artifact to keep up to date (None: no artifact)."""
    bar_holder: list = []
    artifact: dict = {"updated": 0.0}
    metric_log = MetricLog(tracker) if tracker is not None else None

    def on_start(info: dict) -> None:
        start = info["resumed_from"] or 0
        if tracker is not None:
            lineage = info["lineage"]
            tracker.set_tags({
                "lineage.id": lineage["id"], "device": info["device"], "amp": info["amp"],
                "resume.from_step": info["resumed_from"] if info["resumed_from"] is not None else "none",
                "tokenizer.sha256": lineage["tokenizer_sha256"], "base_rows.sha256": lineage["base_rows_sha256"],
                "config.sha256": lineage["config_sha256"]})
            tracker.log_params({"lineage": {k: v for k, v in lineage.items() if k != "mlflow_run_id"},
                                "trainable_params": info["trainable_params"], "total_steps": info["total_steps"]})
            high = metric_log.high_water()
            if info["resumed_from"] is not None and high is not None and high > info["resumed_from"]:
                tracker.set_tags({"metrics.rewind": f"resumed from step {info['resumed_from']}; steps up to {high} "
                                                    "were logged by an earlier attempt and are kept, not re-logged"})
        if progress_artifact:
            artifact["id"] = create_progress_artifact(100.0 * start / max(1, info["total_steps"]),
                                                      key=progress_artifact,
                                                      description=f"training: step {start}/{info['total_steps']}")
        # a bar when asked for on a terminal; else periodic loss lines through the run logger (Prefect's UI)
        bar_holder.append(Progress("training", info["total_steps"], initial=start, log=logger().info,
                                   tty=show_progress and sys.stderr.isatty()))

    def on_progress(step: int, total: int, metrics: dict) -> None:
        if bar_holder:
            bar_holder[0].update(step, metrics)
        # a call to the Prefect API per log interval would cost the loop its latency: at most one per interval
        if artifact.get("id") and (step >= total or time.monotonic() - artifact["updated"] >= PROGRESS_UPDATE_S):
            artifact["updated"] = time.monotonic()
            update_progress_artifact(artifact["id"], 100.0 * step / max(1, total),
                                     description=f"training: step {step}/{total}, text loss "
                                                 f"{metrics['train_text_loss']:.3f}, mel loss "
                                                 f"{metrics['train_mel_loss']:.3f}")

    def on_commit(rows: list) -> None:
        if metric_log is not None and rows:
            skipped = metric_log.commit(rows)
            if skipped:
                # expected after a resume: the last checkpoint's rows are replayed in case a kill lost them
                logger().info("%d metric points were already logged for their step and were skipped", skipped)

    def on_checkpoint(path: Path, sidecar: dict) -> None:
        if tracker is not None:
            tracker.set_tags({"checkpoint.latest": str(path), "checkpoint.step": sidecar["step"],
                              "checkpoint.sha256": sidecar["sha256"]}, wait=False)

    return TrainHooks(on_start=on_start, on_commit=on_commit, on_checkpoint=on_checkpoint,
                      on_progress=on_progress), bar_holder


def with_validation_gates(hooks: TrainHooks, tc, tracker: Tracker | None) -> TrainHooks:
    """Gates at every validation (finite, not diverging, base intact in split mode); a failure stops training."""
    config = GateConfig(text_loss_weight=tc.text_loss_weight, mel_loss_weight=tc.mel_loss_weight)
    started = hooks.on_start

    def on_start(info: dict) -> None:
        if tc.freeze == "split":
            config.base_rows_sha256 = info["lineage"]["base_rows_sha256"]
        started(info)

    return replace(hooks, on_start=on_start, on_validation=validation_hook(config, gate_tagger(tracker)))


def resume_checkpoint(decision: dict, tc, tracker: Tracker | None) -> str | None:
    """What training resumes from: triage's checkpoint. A community run triage resumes is imported into the output
    dir first, once: a later run finds that import's newest checkpoint and continues it."""
    if decision["action"] != "resume":
        return None
    chosen = next(c for c in decision["candidates"] if c["path"] == decision["checkpoint"])
    if chosen["kind"] != "foreign":
        return decision["checkpoint"]
    resumed = continue_community(Path(chosen["path"]), tc, chosen, logger().info)
    if tracker is not None:
        tracker.set_tags({"resume.imported_from": chosen["path"], "resume.checkpoint": str(resumed)})
    return str(resumed)


def training_worker(tc, tracker: Tracker | None) -> TrainResult | str:
    """One torchrun worker of the training stage (rank 0 reports to MLflow and runs the gates, as in-process
    training does): its result, or the one-line problem that stopped it."""
    hooks, _ = progress_hooks(tracker, show_progress=False)
    try:
        return train(tc, with_validation_gates(hooks, tc, tracker))
    except FidelError as exc:
        return str(exc)
    finally:
        if tracker is not None:
            tracker.flush()


def launched_training(tc, tracker: Tracker | None, launch) -> TrainResult:
    """Training in torchrun's workers: launch.nproc here, joining the other machines' when launch.nnodes > 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        results = launch_function(training_worker, (tc, tracker), launch.nproc, launch.nnodes, launch.node_rank,
                                  launch.rdzv_endpoint)
    except SignalException as exc:  # the workers got the signal too: they saved and stopped with every rank
        return preempted_at_newest(Path(tc.output_dir), f"stopped by signal {exc.sigval}")
    except ChildFailedError as exc:
        code, failure = next(iter(exc.failures.items()))
        raise StageFailed(f"training failed: worker {code} exited {failure.exitcode}") from None
    problems = [r for r in results.values() if isinstance(r, str)]
    if problems:
        raise FidelError(None, problems[0])
    return results[min(results)]  # keyed by torchrun's own global ranks: the lowest is this machine's local rank 0


def preempted_at_newest(output_dir: Path, reason: str) -> TrainResult:
    newest, _ = latest_valid_checkpoint(output_dir)
    sidecar = read_sidecar(newest) if newest else {}
    return TrainResult("preempted", sidecar.get("step", 0), sidecar.get("total_steps", 0), newest, {},
                       reason=f"{reason}; newest checkpoint {newest}")


@task(name="training", cache_policy=NO_CACHE)
def training(spec: RunSpec, data_dir: str, decision: dict, tracker: Tracker | None,
             show_progress: bool = False) -> TrainResult:
    launch = spec.launch_options()
    tc = spec.train_config(Path(data_dir), tracker.run_id if tracker else None)
    tc.resume = resume_checkpoint(decision, tc, tracker)
    if tracker is not None:
        tracker.log_params({"train": {k: v for k, v in tc.to_dict().items() if k not in ("resume", "mlflow_run_id")}})
    hooks, bars = progress_hooks(tracker, show_progress, f"{lineage_key(spec.output_dir)}-training-progress")
    hooks = with_validation_gates(hooks, tc, tracker)
    try:
        result = launched_training(tc, tracker, launch) if launch.distributed else train(tc, hooks)
    finally:
        for bar in bars:
            bar.close()
        if tracker is not None:
            tracker.flush()  # metrics and tags the loop queued reach the store before anything reads them
    logger().info("training %s at step %d/%d %s", result.status, result.step, result.total_steps, result.reason)
    if tracker is not None:
        tracker.set_tags({"train.status": result.status, "train.step": result.step})
        publish_loss_curves(tracker, spec.output_dir)
    if result.status == "failed":
        raise StageFailed(f"training failed: {result.reason}")
    return result
