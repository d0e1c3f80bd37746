"""The five-stage fine-tune flow end to end on the tiny project, with a throwaway MLflow store."""

import os
import signal

import pytest
from fidel_tts.flows.finetune import finetune
from fidel_tts.tasks.report import Preempted, StageFailed
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def settings(project, output_dir, mlflow_uri, **train):
    return project.flow_settings(output_dir, mlflow_uri, max_steps=30, **train)


def test_flow_runs_all_stages_and_tracks_them(tiny_project, tmp_path, mlflow_uri):
    rendered = []

    def render_audio(codes, wav):  # the demo's hook writes a real wav through its codec
        rendered.append(len(codes))
        wav.write_bytes(b"RIFF")

    summary = finetune(settings=settings(tiny_project, tmp_path / "run", mlflow_uri), render_audio=render_audio)
    assert summary["status"] == "completed" and summary["step"] == 30
    assert all(g["passed"] or g["advisory"] for g in summary["gates"])
    for stage in ("data", "tokenizer", "triage", "gates"):
        assert (tmp_path / "run" / "reports" / f"{stage}.md").is_file()
    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["gates"] == "PASS" and run.data.tags["triage.decision"] == "fresh"
    curve = client.get_metric_history(run.info.run_id, "val_mel_loss")
    assert [m.step for m in curve] == [0, 10, 20, 30]
    assert curve[-1].value < curve[0].value
    assert client.get_metric_history(run.info.run_id, "train_text_loss")[-1].step == 30
    assert len(rendered) == 1 and rendered[0] > 0 and (tmp_path / "run" / "smoke" / "val0_step00000030.wav").is_file()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "smoke")] == ["smoke/val0_step00000030.wav"]


def test_preempted_flow_resumes_into_the_same_run(tiny_project, tmp_path, mlflow_uri, monkeypatch):
    import fidel_tts.trainer.training.trainer as train_module

    original, calls = train_module.optimizer_step, []

    def step_then_preempt(*args):
        calls.append(1)
        if len(calls) == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    monkeypatch.setattr(train_module, "optimizer_step", step_then_preempt)
    run_settings = settings(tiny_project, tmp_path / "run", mlflow_uri)
    with pytest.raises(Preempted, match="step 12"):
        finetune(settings=run_settings)
    monkeypatch.setattr(train_module, "optimizer_step", original)
    summary = finetune(settings=run_settings)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("fidel").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
    assert runs[0].data.tags["triage.decision"] == "resume"
    steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "train_mel_loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_a_failed_stage_stops_the_flow_with_its_reason(tiny_project, tmp_path, mlflow_uri):
    run_settings = settings(tiny_project, tmp_path / "run", mlflow_uri)
    run_settings["tokenizer"] = str(tiny_project.base_tokenizer)  # Amharic is all <unk> in the base tokenizer
    with pytest.raises(StageFailed, match="data checks"):
        finetune(settings=run_settings)
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("fidel").experiment_id])[0]
    assert run.info.status == "FAILED" and "data checks" in run.data.tags["failed.reason"]


def test_an_enforced_inference_smoke_gate_fails_a_model_that_never_stops(tiny_project, tmp_path, mlflow_uri):
    """30 steps on the tiny project do not teach the model to emit the stop code: enforced, the gate fails."""
    from fidel_tts.tasks.gates import GatesFailed

    run_settings = {**settings(tiny_project, tmp_path / "run", mlflow_uri), "enforce_inference_smoke": True}
    with pytest.raises(GatesFailed, match="inference_smoke"):
        finetune(settings=run_settings)
