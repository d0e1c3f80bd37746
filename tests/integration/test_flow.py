"""The idempotent flow: the output-dir lock, the finished-lineage no-op, the crash-loop guard, stale runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fidel_tts.tasks.lineage import (
    ATTEMPTS_FILE,
    Attempt,
    CrashLoop,
    read_attempts,
    read_finished,
    record_attempt,
)
from fidel_tts.trainer.lock import LOCK_FILE, AlreadyRunning, OutputDirLock
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]


def test_the_lock_is_exclusive_and_says_who_holds_it(tmp_path):
    first = OutputDirLock(tmp_path / "out", "run-1").acquire()
    with pytest.raises(AlreadyRunning, match=rf"already running \(pid {os.getpid()}, host {socket.gethostname()}"):
        OutputDirLock(tmp_path / "out", "run-2").acquire()
    first.release()
    with OutputDirLock(tmp_path / "out", "run-2") as second:
        assert second.previous.flow_run_id == "run-1" and second.previous.released
        assert not second.predecessor_died


def hold_lock(output_dir: Path, then: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from fidel_tts.trainer.lock import OutputDirLock
        lock = OutputDirLock({str(output_dir)!r}, "child-run").acquire()
        print("locked", flush=True)
        {then}
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "out"
    child = hold_lock(out, "time.sleep(60)")
    try:
        with pytest.raises(AlreadyRunning) as busy:
            OutputDirLock(out).acquire()
        assert busy.value.holder.pid == child.pid and busy.value.holder.flow_run_id == "child-run"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with OutputDirLock(out, "next") as lock:  # no leaked slot: the kernel dropped the dead process's lock
        assert lock.predecessor_died and lock.previous.pid == child.pid


def test_a_crash_loop_stops_after_k_attempts_in_the_window(tmp_path):
    def attempt(minute):
        return Attempt(at=1_000_000 + 60 * minute, flow_run_id=f"r{minute}", pid=1, host="h")

    assert [record_attempt(tmp_path, attempt(m), 3, 30) for m in (0, 10, 20)] == [1, 2, 3]
    with pytest.raises(CrashLoop, match="3 resume attempts of this lineage in the last 30 min"):
        record_attempt(tmp_path, attempt(25), 3, 30)
    assert len(read_attempts(tmp_path)) == 3  # a refusal is not an attempt
    assert record_attempt(tmp_path, attempt(41), 3, 30) == 4  # the first two left the window


def test_finished_needs_the_export_to_still_be_there(tmp_path):
    export = tmp_path / "export" / "step00000030"
    export.mkdir(parents=True)
    (export / "export.json").write_text("{}")
    (tmp_path / "finished.json").write_text(json.dumps({"status": "completed", "export_dir": str(export)}))
    assert read_finished(tmp_path)["status"] == "completed"
    (export / "export.json").unlink()
    assert read_finished(tmp_path) is None


def settings(project, output_dir, mlflow_uri, **train):
    return project.flow_settings(output_dir, mlflow_uri, max_steps=20, **train)


@pytest.mark.slow
def test_a_second_run_on_a_locked_output_dir_exits_at_once(tiny_project, tmp_path, mlflow_uri):
    from fidel_tts.flows.finetune import finetune

    out = tmp_path / "out"
    with OutputDirLock(out, "the-first-run"):
        started = time.monotonic()
        state = finetune(settings=settings(tiny_project, out, mlflow_uri), return_state=True)
        took = time.monotonic() - started
    assert state.is_completed()
    assert state.message.startswith(f"already running (pid {os.getpid()}, host {socket.gethostname()}")
    assert state.result()["status"] == "already_running"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # touched nothing
    assert not MlflowClient(mlflow_uri).search_runs([e.experiment_id for e in
                                                     MlflowClient(mlflow_uri).search_experiments()])
    assert took < 30, f"took {took:.1f} s"


@pytest.mark.slow
def test_a_finished_lineage_is_a_noop(tiny_project, tmp_path, mlflow_uri):
    from fidel_tts.flows.finetune import finetune

    out = tmp_path / "out"
    summary = finetune(settings=settings(tiny_project, out, mlflow_uri))
    assert summary["status"] == "completed" and summary["resume_count"] == 0
    assert summary["registered_model"] == {"name": "fidel-am", "version": "1", "alias": "candidate"}
    client = MlflowClient(mlflow_uri)
    tags = client.get_run(summary["mlflow_run_id"]).data.tags
    assert tags["resume.count"] == "0" and tags["gates"] == "PASS" and tags["triage.decision"] == "fresh"
    assert len(tags["git.commit"]) >= 7 and len(tags["data.sha256"]) == 64 and len(tags["tokenizer.sha256"]) == 64
    points = len(client.get_metric_history(summary["mlflow_run_id"], "train_mel_loss"))

    state = finetune(settings=settings(tiny_project, out, mlflow_uri), return_state=True)
    assert state.is_completed() and state.message == "lineage already finished at step 20: nothing to do"
    again = state.result()
    assert again["status"] == "already_finished" and again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert len(client.get_metric_history(summary["mlflow_run_id"], "train_mel_loss")) == points
    assert not (out / ATTEMPTS_FILE).exists()
    assert len(client.search_model_versions("name='fidel-am'")) == 1


@pytest.mark.slow
def test_a_crash_loop_fails_clearly_and_stale_running_runs_are_marked_crashed(tiny_project, tmp_path, mlflow_uri):
    from fidel_tts.flows.finetune import finetune
    from fidel_tts.tasks.stale_runs import lock_tag
    from fidel_tts.tasks.tracking import open_run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Running

    out = tmp_path / "out"
    tracker = open_run(out, mlflow_uri)  # the lineage started ...
    now = time.time()
    for minute in (30, 20, 10):  # ... and was resumed three times in the last half hour
        record_attempt(out, Attempt(now - 60 * minute, f"r{minute}", 1, "h"), 10, 60)
    with get_client(sync_client=True) as client:
        # a run that held the lock, then its machine vanished: the server still shows it Running
        dead = client.create_flow_run(finetune, parameters={}, tags=[lock_tag(out)], state=Running())
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "flow_run_id": str(dead.id),
                                             "acquired_at": now - 60, "released": False}))

    state = finetune(settings=settings(tiny_project, out, mlflow_uri), return_state=True)
    assert state.is_failed() and "crash loop: 3 resume attempts of this lineage in the last 60 min" in state.message
    with pytest.raises(CrashLoop):
        state.result()
    run = MlflowClient(mlflow_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "crash_loop"
    with get_client(sync_client=True) as client:
        stale = client.read_flow_run(dead.id).state
    assert stale.type == StateType.CRASHED and "never released it" in stale.message
    assert len(read_attempts(out)) == 3


@pytest.mark.slow
def test_a_failed_gate_finishes_the_lineage_and_reruns_fail_fast(tiny_project, tmp_path, mlflow_uri, monkeypatch):
    import fidel_tts.tasks.gates
    from fidel_tts.flows.finetune import finetune
    from fidel_tts.tasks.gates import GatesFailed
    from fidel_tts.trainer.report import Check

    monkeypatch.setattr(fidel_tts.tasks.gates, "not_diverging", lambda losses: Check("not_diverging", False, "forced",
                                                                                 "validation loss diverged"))
    out = tmp_path / "out"
    with pytest.raises(GatesFailed, match="gate not_diverging failed"):
        finetune(settings=settings(tiny_project, out, mlflow_uri))
    record = json.loads((out / "finished.json").read_text())
    assert record["status"] == "gates_failed" and Path(record["export_dir"], "export.json").is_file()
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("fidel").experiment_id])[0]
    assert run.data.tags["gates"] == "FAIL" and run.info.status == "FAILED"
    assert not client.search_registered_models()  # not a candidate

    checkpoints = sorted(p.name for p in out.glob("ckpt-*"))
    state = finetune(settings=settings(tiny_project, out, mlflow_uri), return_state=True)
    assert state.is_failed() and "already finished with a failed gate" in state.message
    assert sorted(p.name for p in out.glob("ckpt-*")) == checkpoints and not (out / ATTEMPTS_FILE).exists()
