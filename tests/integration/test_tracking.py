"""MLflow lineage: one run reopened on resume, params once, no step twice, export logged and registered once."""

import json
import time

import pytest
from fidel_tts.tasks.report import plot_curves, publish_loss_curves
from fidel_tts.tasks.tracking import (
    RUN_FILE,
    MetricLog,
    Tracker,
    log_export_model,
    open_run,
    register_export,
    start_system_metrics,
)
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.training.checkpoint import save_checkpoint
from mlflow import MlflowClient


def test_open_run_creates_one_run_and_reopens_it(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")  # would silently turn a new run into a resume
    first = open_run(tmp_path / "out", mlflow_uri, run_name="lineage")
    assert not first.resumed
    first.finish("KILLED")
    again = open_run(tmp_path / "out", mlflow_uri)
    client = MlflowClient(mlflow_uri)
    assert again.resumed and again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    assert len(client.search_runs([first.experiment_id])) == 1


def test_a_lost_run_record_is_recovered_from_the_checkpoint_sidecar(tmp_path, mlflow_uri):
    out = tmp_path / "out"
    first = open_run(out, mlflow_uri)
    save_checkpoint(out, 10, {"step": 10}, {"mlflow_run_id": first.run_id})
    (out / RUN_FILE).unlink()
    again = open_run(out, mlflow_uri)
    assert again.resumed and again.run_id == first.run_id
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == first.run_id


def test_a_run_missing_from_the_store_is_refused(tmp_path, mlflow_uri):
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_FILE).write_text(json.dumps({"run_id": "f" * 32}))
    with pytest.raises(FidelError, match="not in"):
        open_run(out, mlflow_uri)


def test_params_are_logged_once(tmp_path, mlflow_uri):
    tracker = open_run(tmp_path / "out", mlflow_uri)
    tracker.log_params({"train": {"learning_rate": 0.001, "steps": [1, 2]}})
    tracker.log_params({"train": {"learning_rate": 0.5, "batch_size": 8}})  # a resume with an edited run file
    params = MlflowClient(mlflow_uri).get_run(tracker.run_id).data.params
    assert params == {"train.learning_rate": "0.001", "train.steps": "[1, 2]", "train.batch_size": "8"}


def test_metric_log_never_logs_a_step_twice_across_a_resume(tmp_path, mlflow_uri):
    tracker = open_run(tmp_path / "out", mlflow_uri)
    MetricLog(tracker).commit([(s, {"train_loss": 1.0 / s, "note": "text"}) for s in range(1, 31)])
    # a new process resumes from an older checkpoint (step 20) after steps up to 30 were already committed
    resumed = open_run(tmp_path / "out", mlflow_uri)
    log = MetricLog(resumed)
    assert log.high_water() == 30
    skipped = log.commit([(s, {"train_loss": 2.0, "val_loss": 3.0}) for s in range(21, 41)])
    assert skipped == 10
    resumed.flush()  # commit queues on MLflow's async logging thread; the store has it after a flush
    client = MlflowClient(mlflow_uri)
    steps = [m.step for m in client.get_metric_history(tracker.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 41))
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "val_loss")) == list(range(21, 41))
    kept = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "train_loss")}
    assert kept[25] == pytest.approx(1 / 25) and kept[35] == 2.0


def test_export_is_logged_as_a_model_and_registered_once_with_the_candidate_alias(tmp_path, mlflow_uri):
    tracker = open_run(tmp_path / "out", mlflow_uri)
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text("{}")
    (export / "gpt.pth").write_bytes(b"weights")
    for _ in range(2):  # a re-run after a crash between logging and finishing
        model_id = log_export_model(tracker, export, "fidel-am", 40, {"val_mel_loss": 2.5})
        version = register_export(tracker, "fidel-am", model_id)
    client = MlflowClient(mlflow_uri)
    assert version == "1"
    assert len(client.search_model_versions("name='fidel-am'")) == 1
    aliased = client.get_model_version_by_alias("fidel-am", "candidate")
    assert str(aliased.version) == "1" and aliased.run_id == tracker.run_id and model_id in aliased.source
    model = client.get_logged_model(model_id)
    assert model.source_run_id == tracker.run_id and str(model.status) == "READY"
    assert [(m.key, m.value, m.step) for m in model.metrics] == [("final_val_mel_loss", 2.5, 40)]
    assert sorted(a.path for a in client.list_logged_model_artifacts(model_id)) == ["export.json", "gpt.pth"]
    assert [o.model_id for o in client.get_run(tracker.run_id).outputs.model_outputs] == [model_id]
    other = open_run(tmp_path / "other", mlflow_uri)
    other_model = log_export_model(other, export, "fidel-am", 40, {})
    assert register_export(other, "fidel-am", other_model) == "2"
    assert client.get_model_version_by_alias("fidel-am", "candidate").run_id == other.run_id


def test_the_run_links_to_its_dataset_description_and_ui_page(tmp_path, mlflow_uri):
    tracker = open_run(tmp_path / "out", mlflow_uri)
    tracker.log_dataset("out-train", "ab" * 32, "train", "/data/train.parquet", {"rows": 3})
    tracker.log_dataset("out-val", "cd" * 32, "val", "/data/val.parquet", {"rows": 1})
    tracker.describe("**lineage** out")
    run = MlflowClient(mlflow_uri).get_run(tracker.run_id)
    inputs = {d.dataset.name: (d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert inputs == {"out-train": ("ab" * 8, "train"), "out-val": ("cd" * 8, "val")}
    assert run.data.tags["mlflow.note.content"] == "**lineage** out"
    assert tracker.url() is None and f"mlflow ui --backend-store-uri {mlflow_uri}" in tracker.how_to_view()
    served = Tracker("http://mlflow.example:5000/", tracker.run_id, tracker.experiment_id, False)
    assert served.url() == (f"http://mlflow.example:5000/#/experiments/{tracker.experiment_id}/runs/"
                            f"{tracker.run_id}?workflowType=machine_learning")


def test_system_metrics_resume_without_duplicate_steps(tmp_path, mlflow_uri):
    tracker = open_run(tmp_path / "out", mlflow_uri)
    for _ in range(2):  # the second monitor is a resumed attempt of the same lineage
        monitor = start_system_metrics(tracker, interval_s=0.2)
        time.sleep(1.2)
        monitor.finish()
    client = MlflowClient(mlflow_uri)
    metrics = client.get_run(tracker.run_id).data.metrics
    cpu = [m.step for m in client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")]
    assert "system/system_memory_usage_megabytes" in metrics
    assert len(cpu) >= 4 and len(cpu) == len(set(cpu))


def test_loss_curves_are_drawn_from_the_whole_lineage(tmp_path, mlflow_uri):
    assert plot_curves({}, tmp_path / "none.png") is None
    tracker = open_run(tmp_path / "out", mlflow_uri)
    MetricLog(tracker).commit([(s, {"train_text_loss": 5 - s / 10, "train_mel_loss": 4 - s / 20,
                                    **({"val_mel_loss": 4.5 - s / 20} if s % 10 == 0 else {})})
                               for s in range(0, 31, 5)])
    path = publish_loss_curves(tracker, tmp_path / "out")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [a.path for a in MlflowClient(mlflow_uri).list_artifacts(tracker.run_id, "plots")] == [
        "plots/loss_curves.png"]


class Killed(BaseException):
    """Stands in for SIGKILL: the process stops where it is, nothing after runs."""


@pytest.mark.slow
def test_a_kill_between_checkpoints_then_a_resume_logs_every_step_once(tiny_project, tmp_path, mlflow_uri,
                                                                        make_train_config):
    from fidel_tts.tasks.train import progress_hooks
    from fidel_tts.trainer.training.trainer import train

    out = tmp_path / "out"
    tracker = open_run(out, mlflow_uri)
    hooks, _ = progress_hooks(tracker, show_progress=False, progress_artifact=False)
    committed = hooks.on_progress

    def die_at_25(step, total, metrics):
        committed(step, total, metrics)
        if step == 25:  # after the checkpoint at 20, before the one at 30
            raise Killed

    hooks.on_progress = die_at_25
    tc = make_train_config(tiny_project, out, resume="auto", mlflow_run_id=tracker.run_id)
    with pytest.raises(Killed):
        train(tc, hooks)
    tracker.flush()  # the hooks queue their writes (tasks.train.training flushes when train returns)
    client = MlflowClient(mlflow_uri)
    assert max(m.step for m in client.get_metric_history(tracker.run_id, "train_mel_loss")) == 20

    resumed = open_run(out, mlflow_uri)
    hooks, _ = progress_hooks(resumed, show_progress=False, progress_artifact=False)
    result = train(tc, hooks)
    assert result.status == "completed" and result.resumed_from == 20
    resumed.flush()
    for key in ("train_mel_loss", "train_text_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(tracker.run_id, key)) == list(range(5, 31, 5))
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "val_mel_loss")) == [0, 10, 20, 30]
    assert client.get_run(tracker.run_id).data.tags["resume.from_step"] == "20"
