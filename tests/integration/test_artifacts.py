"""What the Prefect and MLflow UIs show of a lineage: artifacts that render, state messages, links both ways."""

import json
import re

import pytest
from fidel_tts.tasks.report import lineage_key
from fidel_tts.trainer.evaluation.gates import reasons_markdown, report_markdown
from fidel_tts.trainer.markdown import table
from fidel_tts.trainer.report import Check
from markdown_it import MarkdownIt
from mlflow import MlflowClient

PARSER = MarkdownIt("commonmark", {"html": True}).enable("table")  # html on: a swallowed tag shows as a token
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def check_renders(markdown: str) -> list[str]:
    """Parse as the UIs do; every table row has as many cells as its header, and no value became HTML.
    Returns the rendered text of every cell and list item."""
    tokens = PARSER.parse(markdown)
    lines = markdown.splitlines()
    for token in tokens:
        if token.type == "table_open":
            start, end = token.map
            header, *rows = [line for i, line in enumerate(lines[start:end]) if i != 1]
            width = len(UNESCAPED_PIPE.findall(header))
            for row in rows:
                assert len(UNESCAPED_PIPE.findall(row)) == width, f"row {row!r} has other cells than {header!r}"
        assert token.type != "html_block", f"HTML block: {token.content!r}"
        for child in token.children or []:
            assert child.type != "html_inline", f"a value was taken for HTML: {child.content!r}"
    return [t.content for t in tokens if t.type == "inline"]


def test_values_with_pipes_and_angle_brackets_render_as_themselves():
    gates = [Check("not_diverging", True, "|Δ| 0.12 < 0.5", "rises <unk> | " + "long " * 40),
             Check("inference_smoke", False, "0/4 stopped", advisory=True)]
    check_renders(report_markdown(gates) + "\n" + reasons_markdown(gates))
    rendered = PARSER.render(report_markdown(gates))
    assert "<td>|Δ| 0.12 &lt; 0.5</td>" in rendered and "<td>FAIL (advisory)</td>" in rendered
    assert "long long" not in rendered  # the table is narrow: the reason is in the details
    details = PARSER.render(reasons_markdown(gates))
    assert "rises &lt;unk&gt; | long long" in details and "<unk>" not in details


def test_long_cells_are_cut_to_fit():
    markdown = table(["name", "value"], [["x", "y" * 500]])
    check_renders(markdown)
    assert max(len(line) for line in markdown.splitlines()) < 80


def test_artifact_keys_are_per_lineage_and_valid(tmp_path):
    one, other = lineage_key(tmp_path / "a" / "Fine_Tune 1"), lineage_key(tmp_path / "b" / "Fine_Tune 1")
    assert one != other and one.startswith("fine-tune-1-")
    assert re.fullmatch(r"[a-z0-9-]+", one)


def test_the_resume_schedule_with_nothing_configured_ends_completed_with_what_to_do(tmp_path, tiny_project,
                                                                                     mlflow_uri):
    from fidel_tts.flows.finetune import finetune

    state = finetune(run_config=str(tmp_path / "run.yaml"), only_resume=True, return_state=True)
    assert state.is_completed() and "no run file" in state.message and "run_config" in state.message
    run_file = tmp_path / "run.yaml"
    import yaml

    run_file.write_text(yaml.safe_dump(tiny_project.flow_settings(tmp_path / "out", mlflow_uri)))
    state = finetune(run_config=str(run_file), only_resume=True, return_state=True)
    assert state.is_completed() and "not started yet" in state.message and "fidel-finetune/finetune" in state.message
    assert not (tmp_path / "out" / "mlflow_run.json").exists()


def test_a_fidel_failure_is_a_failed_state_with_its_one_line_reason(tmp_path):
    from fidel_tts.flows.finetune import finetune

    state = finetune(run_config=str(tmp_path / "missing.yaml"), return_state=True)
    assert state.is_failed() and state.message == f"{tmp_path / 'missing.yaml'}: run file not found"


@pytest.mark.slow
def test_a_lineage_tells_its_story_in_both_uis(tiny_project, tmp_path, mlflow_uri, monkeypatch):
    import functools

    import fidel_tts.tasks.gates
    from fidel_tts.flows.finetune import finetune
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    # an advisory gate that fails whatever the tiny model decodes: how the UIs show one is what is tested
    strict = functools.partial(fidel_tts.tasks.gates.inference_smoke, min_ratio=100.0)
    monkeypatch.setattr(fidel_tts.tasks.gates, "inference_smoke", strict)
    out = tmp_path / "out"
    summary = finetune(settings=tiny_project.flow_settings(out, mlflow_uri, max_steps=20))
    key = lineage_key(out)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=key)))
    by_key = {a.key.removeprefix(f"{key}-"): a for a in artifacts}
    assert {"data", "data-details", "tokenizer", "tokenizer-details", "triage", "gates", "gates-details", "mlflow",
            "training-progress"} <= set(by_key)
    for artifact in by_key.values():
        if artifact.type == "markdown":
            check_renders(artifact.data)
    assert "&lt;unk&gt; rate" in by_key["data"].data
    gates = by_key["gates"].data
    assert "**Gates: PASS; advisory FAIL: inference_smoke**" in gates and "FAIL (advisory)" in gates
    assert summary["mlflow_run_id"] in by_key["mlflow"].data and "mlflow ui --backend-store-uri" in by_key["mlflow"].data

    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    tags = run.data.tags
    assert tags["gates"] == "PASS" and tags["gates.advisory"] == "FAIL: inference_smoke"
    assert tags["gate.inference_smoke"] == "FAIL (advisory)"
    contexts = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(contexts) == {"train", "val"} and contexts["train"].name == "out-train"
    built = json.loads((out / "data" / "dataset.json").read_text())["splits"]
    assert contexts["train"].digest == built["train"]["content_sha256"][:16]
    model = client.get_logged_model(tags["export.model_id"])
    assert model.source_run_id == run.info.run_id and {m.key for m in model.metrics} >= {"final_val_mel_loss"}
    note = tags["mlflow.note.content"]
    assert note.startswith("**fidel lineage out: completed**") and "- triage: fresh" in note and "- gates: PASS" in note
    check_renders(note)


def test_the_final_summary_lists_every_gate_advisory_ones_marked(capsys):
    from fidel_tts.flows.finetune import print_summary

    gates = [Check("finite", True, "all finite").to_dict(),
             Check("inference_smoke", False, "0/4 stopped", advisory=True).to_dict()]
    print_summary({"mlflow_run_id": "abc", "experiment_id": "1", "gates": gates, "export_dir": "/x/export",
                   "tracking_uri": "sqlite:///mlruns/mlflow.db"})
    out = capsys.readouterr().out
    assert "  PASS finite: all finite\n" in out and "  FAIL (advisory) inference_smoke: 0/4 stopped\n" in out
    assert "#/experiments/1/runs/abc?workflowType=machine_learning" in out


def test_fidel_failures_reach_prefect_logs_as_one_line_without_a_traceback():
    import logging
    import sys

    from fidel_tts.tasks.report import StageFailed

    prefect_tasks = logging.getLogger("prefect.task_runs")  # what Prefect logs a failed task run's exception to
    records = []
    for exc in (StageFailed("gate finite failed"), ValueError("a bug")):
        try:
            raise exc
        except Exception:
            records.append(prefect_tasks.makeRecord(prefect_tasks.name, logging.ERROR, __file__, 0, "failed: %r",
                                                    (exc,), sys.exc_info()))
        prefect_tasks.filter(records[-1])
    assert [r.exc_info is None for r in records] == [True, False]  # a bug keeps its traceback


def test_with_a_tracking_server_the_flow_links_to_the_mlflow_run_page(tmp_path, caplog):
    import logging

    from fidel_tts.tasks.lineage import link_runs
    from fidel_tts.tasks.tracking import Tracker
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    tracker = Tracker("http://mlflow.example:5000", "abc123", "7", resumed=False)
    with caplog.at_level(logging.INFO, logger="fidel"):
        link_runs(tracker, tmp_path / "am", logging.getLogger("fidel"))
    url = "http://mlflow.example:5000/#/experiments/7/runs/abc123?workflowType=machine_learning"
    assert f"MLflow run abc123: {url}" in caplog.messages
    with get_client(sync_client=True) as client:
        [link] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[f"{lineage_key(tmp_path / 'am')}-mlflow"])))
    assert link.data == f"[MLflow run abc123]({url})"  # Prefect stores a link artifact as markdown
