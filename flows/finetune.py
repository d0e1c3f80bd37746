"""The fine-tune flow: data checks → tokenizer verification → checkpoint triage → training → gates.

With a `prepare:` section in run.yaml the first stage is `prepare` (tasks/prepare.py): features from audio, then
the same checks and dataset.

Idempotent, so a scheduled deployment can re-run it at any time (docs/design.md §7):
- an OS file lock on the output dir: a second run exits Completed at once, "already running (pid, host)";
- a finished lineage (export present, gates passed) is a no-op;
- otherwise it triages the checkpoints and resumes, counting resumes so that a crash loop stops.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from fidel_tts.tasks.data import data_checks
from fidel_tts.tasks.gates import GatesFailed, RenderAudio, data_dir_of, evaluation_gates
from fidel_tts.tasks.lineage import (
    Attempt,
    CrashLoop,
    describe_run,
    link_runs,
    read_finished,
    record_attempt,
    started,
    write_finished,
)
from fidel_tts.tasks.prepare import prepared_data
from fidel_tts.tasks.report import Preempted, StageFailed, failed_state
from fidel_tts.tasks.spec import RunSpec, load_run_spec, run_spec_from_dict
from fidel_tts.tasks.stale_runs import claim_and_sweep
from fidel_tts.tasks.tokenizer import tokenizer_verification
from fidel_tts.tasks.tracking import Tracker, git_commit, open_run, start_system_metrics
from fidel_tts.tasks.train import training
from fidel_tts.tasks.triage import checkpoint_triage
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.lock import AlreadyRunning, OutputDirLock
from fidel_tts.trainer.process import Stopped
from fidel_tts.trainer.report import Check, print_report
from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.runtime import deployment, flow_run
from prefect.states import Completed


@flow(name="fidel-finetune")
def finetune(run_config: str | None = None, settings: dict | None = None, show_progress: bool = False,
             resume: str | None = None, max_resume_attempts: int = 3, resume_window_minutes: float = 60.0,
             only_resume: bool = False, node_rank: int | None = None, render_audio: RenderAudio | None = None):
    """resume: None keeps the run file's setting; "auto" continues from the newest valid checkpoint (fresh when
    there is none); a path resumes that checkpoint. More than max_resume_attempts resumes within
    resume_window_minutes is a crash loop: the run fails instead of resuming again. only_resume (the resume
    schedule): no run file, or a lineage not started yet, ends Completed with a message saying what to configure.
    A fidel failure ends the flow run Failed with its one-line reason as the state message. node_rank: this
    machine's in a multi-node training (the run file's launch.node_rank otherwise): node 0 runs every stage, the
    others only join its training (docs/deployments.md). render_audio: a hook that writes decoded codes as a .wav
    (the demo passes its codec); without it the gates write no audio."""
    try:
        return start_or_resume(run_config, settings, show_progress, resume, max_resume_attempts,
                               resume_window_minutes, only_resume, node_rank, render_audio)
    except (FidelError, StageFailed) as exc:
        return failed_state(exc)


def start_or_resume(run_config: str | None, settings: dict | None, show_progress: bool, resume: str | None,
                    max_resume_attempts: int, resume_window_minutes: float, only_resume: bool,
                    node_rank: int | None = None, render_audio: RenderAudio | None = None):
    if only_resume and not (run_config and Path(run_config).is_file()):
        return nothing_to_resume(f"no run file {run_config or '(run_config not set)'}: set this deployment's "
                                 "run_config parameter to your run.yaml (docs/deployments.md)")
    spec = load_run_spec(run_config) if run_config else run_spec_from_dict(settings or {}, Path.cwd() / "run.yaml")
    if resume is not None:
        spec.resume = resume
    if node_rank is not None:
        spec.launch = {**spec.launch, "node_rank": node_rank}
    this_node = spec.launch_options().node_rank
    follower = this_node > 0
    if only_resume and not started(Path(spec.output_dir)):
        return nothing_to_resume(f"lineage {spec.output_dir} not started yet: start it with `prefect deployment run "
                                 f"fidel-finetune/finetune -p run_config={run_config}`; this schedule only resumes")
    run_id = flow_run.id
    try:  # another machine of a multi-node training holds a lock of its own, beside node 0's
        lock = OutputDirLock(Path(spec.output_dir) / (f"node-{this_node}" if follower else ""), run_id).acquire()
    except AlreadyRunning as busy:
        get_run_logger().info("%s; nothing to do", busy)
        holder = vars(busy.holder) if busy.holder else None
        return Completed(message=f"already running ({busy.holder.describe() if busy.holder else 'holder unknown'})",
                         data={"status": "already_running", "output_dir": spec.output_dir, "holder": holder,
                               "message": str(busy)})
    try:
        if follower:
            return follow(spec)
        return run_lineage(spec, lock, run_id, show_progress, max_resume_attempts, resume_window_minutes,
                           render_audio)
    finally:
        lock.release()


def follow(spec: RunSpec):
    """Node R > 0 of a multi-node training: no stages and no MLflow run of its own. Its processes join node 0's
    rendezvous (node 0 arrives once its data checks and triage are done) and stop when node 0's training does;
    rank 0, on node 0, decides fresh or resume for every rank."""
    finished = read_finished(Path(spec.output_dir))
    if finished:
        message = f"lineage already finished ({finished['status']}): nothing to join"
        get_run_logger().info(message)
        return Completed(message=message, data={"status": "already_finished", "output_dir": spec.output_dir})
    result = training(spec, str(data_dir_of(spec)), {"action": "fresh"}, None)
    if result.status == "preempted":
        raise Preempted(f"preempted at step {result.step}/{result.total_steps}, resumable: {result.reason}")
    return {"status": result.status, "node_rank": spec.launch_options().node_rank, "step": result.step}


def nothing_to_resume(message: str) -> Completed:
    get_run_logger().info(message)
    return Completed(message=message, data={"status": "not_configured", "message": message})


def run_lineage(spec: RunSpec, lock: OutputDirLock, run_id: str | None, show_progress: bool,
                max_resume_attempts: int, resume_window_minutes: float, render_audio: RenderAudio | None = None):
    log = get_run_logger()
    output_dir = Path(spec.output_dir)
    try:
        crashed = claim_and_sweep(lock, output_dir, run_id)
    except Exception as exc:  # bookkeeping on the server must not stop the training
        log.warning("could not mark stale flow runs of this output dir: %s", exc)
        crashed = []
    if crashed:
        log.info("marked %d stale Running flow run(s) of this output dir Crashed: %s", len(crashed), ", ".join(crashed))
    finished = read_finished(output_dir)
    if finished and finished["status"] == "completed":
        message = f"lineage already finished at step {finished['summary']['step']}: nothing to do"
        log.info(message)
        return Completed(message=message, data={**finished["summary"], "status": "already_finished"})
    if finished:
        raise GatesFailed(f"lineage already finished with a failed gate ({finished['reason']}); "
                          "start a new output_dir to train again")
    resuming = started(output_dir)
    tracker = open_run(spec.output_dir, spec.tracking_uri, spec.experiment, spec.run_name)
    resume_count = 0
    if resuming:
        try:
            resume_count = record_attempt(output_dir, Attempt(time.time(), run_id, os.getpid(), socket.gethostname()),
                                          max_resume_attempts, resume_window_minutes)
        except CrashLoop as exc:
            tracker.set_tags({"status": "crash_loop", "failed.reason": str(exc)[:4000]})
            tracker.finish("FAILED")
            raise
    commit = git_commit()
    tracker.set_tags({"resume.count": resume_count, "git.commit": commit, "mlflow.source.git.commit": commit,
                      "output_dir": str(output_dir), "prefect.flow_run_id": run_id or "none",
                      "prefect.deployment": deployment.name or "none", "status": "running"})
    link_runs(tracker, output_dir, log)
    monitor = start_system_metrics(tracker)
    try:
        data = prepared_data(spec, tracker) if spec.prepare else data_checks(spec, tracker)
        if data.get("status") == "preempted":
            raise Preempted(f"preempted while preparing features ({data['clips']} clips done), resumable")
        tracker.set_tags({"data.sha256": data["content_sha256"]})  # rows' hash: the .arrow cache never changes it
        tokenizer_verification(spec, data["texts"], tracker)
        decision = checkpoint_triage(spec, tracker)
        result = training(spec, data["data_dir"], decision, tracker, show_progress)
        if result.status == "preempted":
            raise Preempted(f"preempted at step {result.step}/{result.total_steps}, resumable: {result.reason}")
        gates = evaluation_gates(spec, result, tracker, render_audio)
    except (Preempted, Stopped, KeyboardInterrupt, TerminationSignal):  # a signal: the next run continues this one
        monitor.finish()
        tracker.set_tags({"status": "preempted"})
        describe_run(tracker, "preempted, resumable")
        tracker.finish("KILLED")
        raise
    except Exception as exc:
        monitor.finish()
        tracker.set_tags({"status": "failed", "failed.reason": str(exc)[:4000]})
        describe_run(tracker, "failed")
        tracker.finish("FAILED")
        if isinstance(exc, GatesFailed):
            export_dir = tracker.tags().get("export.dir", "")
            write_finished(output_dir, {"status": "gates_failed", "reason": str(exc), "export_dir": export_dir})
        raise
    monitor.finish()
    summary = {"status": "completed", "mlflow_run_id": tracker.run_id, "experiment_id": tracker.experiment_id,
               "tracking_uri": spec.tracking_uri, "output_dir": spec.output_dir, "step": result.step,
               "train_seconds": result.wall_seconds, "resume_count": resume_count, "val_history": result.val_history, "last_train": result.last_train,
               **gates}
    tracker.set_tags({"status": "completed"})
    describe_run(tracker, "completed")
    tracker.finish("FINISHED")
    write_finished(output_dir, {"status": "completed", "export_dir": gates["export_dir"], "summary": summary,
                                "finished_at": time.time()})
    return summary


def print_summary(summary: dict) -> None:
    """Every gate, advisory ones marked, and the way to the MLflow run."""
    print(f"\nMLflow run {summary['mlflow_run_id']} (experiment {summary['experiment_id']})")
    print_report([Check(**gate) for gate in summary["gates"]], indent="  ")
    print(f"exported model: {summary['export_dir']}")
    tracker = Tracker(summary["tracking_uri"], summary["mlflow_run_id"], summary["experiment_id"], resumed=False)
    print(tracker.how_to_view())
