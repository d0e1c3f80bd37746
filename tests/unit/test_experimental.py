"""The experimental policy on a real broken community checkpoint: backup with checksum, base rows restored,
their moments zeroed, a resume into a new dir, and the text-loss gate aborting a run that misses its bound."""

from __future__ import annotations

import pytest
import torch
from fidel_tts.trainer.checkpoints.experimental import (
    backup_checkpoint,
    experimental_resume,
    repair_community_state,
)
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.weights import torch_load, upstream_keys_of

from tests.fixtures.community_run import Project, TrainerFlags, community_run


@pytest.fixture(scope="module")
def broken(tiny_project_template, tmp_path_factory):
    p = tiny_project_template
    project = Project(p.base_checkpoint, p.base_config, p.tokenizer, p.train_manifest)
    flags = TrainerFlags(learning_rate=3e-3, warmup_steps=1, save_interval=2)  # every text row moves in 2 steps
    return community_run(project, tmp_path_factory.mktemp("broken"), 2, flags, version="cf31c91")[-1]


def test_repair_restores_base_rows_and_zeroes_their_moments(tiny_project_template, broken):
    base = upstream_keys_of(torch_load(tiny_project_template.base_checkpoint), "base")
    b = base["text_embedding.weight"].shape[0] - 1
    raw = torch_load(broken)
    repaired, record = repair_community_state(raw, base, b)
    assert record["rows_restored"]["text_embedding.weight"] == b
    assert 0 < record["moments_zeroed"]["text_embedding.weight.exp_avg"] <= b  # base tokens seen in the data
    assert record["moments_zeroed"]["text_head.weight.exp_avg"] == b  # every logit row gets a gradient
    for key in ("text_embedding.weight", "text_head.weight", "text_head.bias"):
        assert torch.equal(repaired["model"][key][:b], base[key][:b])
        assert torch.equal(repaired["model"][key][b:], raw["model"][key][b:])  # new rows kept
    moments = repaired["optimizer"]["state"][0]  # id 0: text_embedding.weight
    assert not moments["exp_avg"][:b].any() and moments["exp_avg"][b:].any()
    assert raw["model"]["text_embedding.weight"][:b].ne(base["text_embedding.weight"][:b]).any()  # input untouched


def test_backup_has_a_checksum_and_is_never_overwritten(broken, tmp_path):
    saved = backup_checkpoint(broken, tmp_path)
    assert saved.sha256 == file_sha256(broken) == file_sha256(saved.path)
    assert (tmp_path / f"{broken.name}.sha256").read_text().split()[0] == saved.sha256
    saved.path.write_bytes(b"other")
    from fidel_tts.trainer.errors import FidelError

    with pytest.raises(FidelError, match="not overwritten"):
        backup_checkpoint(broken, tmp_path)


@pytest.mark.slow
def test_text_loss_gate_aborts_an_experimental_resume(tiny_project, broken, make_train_config, mlflow_uri,
                                                      tmp_path):
    from fidel_tts.tasks.gates import gate_tagger
    from fidel_tts.tasks.tracking import open_run

    out = tmp_path / "experimental"
    tracker = open_run(out, mlflow_uri)
    before = file_sha256(broken)
    tc = make_train_config(tiny_project, out, max_steps=8, val_interval=1, save_interval=100)
    run = experimental_resume(broken, tc, text_loss_threshold=0.01, within_steps=2, on_gates=gate_tagger(tracker))
    assert run.gate["by_step"] == 4
    assert run.result.status == "failed" and run.result.step == 4 and "text_loss" in run.result.reason
    assert run.result.resumed_from == 2
    tags = tracker.tags()
    assert tags["gate.text_loss"] == "FAIL" and tags["gates"] == "FAIL" and "step 4" in tags["gates.failed"]
    assert tags["gate.base_intact"] == "PASS"
    assert file_sha256(broken) == before and (out / "backup" / broken.name).is_file()
    saved = torch_load(run.result.checkpoint)  # the failed run saved where it stopped
    assert saved["step"] == 4 and saved["lineage"]["imported"]["policy"] == "experimental"


def test_refusals_leave_nothing_behind(tiny_project, broken, make_train_config, tmp_path):
    from fidel_tts.trainer.errors import FidelError

    truncated = tmp_path / "model_step2.pth"
    truncated.write_bytes(broken.read_bytes()[:5000])
    out = tmp_path / "experimental"
    with pytest.raises(FidelError, match="unreadable or truncated"):
        experimental_resume(truncated, make_train_config(tiny_project, out, max_steps=8))
    with pytest.raises(FidelError, match="--max-steps beyond it"):
        experimental_resume(broken, make_train_config(tiny_project, out, max_steps=2))
    other = make_train_config(tiny_project, out, max_steps=8, tokenizer=str(tiny_project.base_tokenizer))
    with pytest.raises(FidelError, match="another vocabulary"):  # fails after the backup was made: it goes too
        experimental_resume(broken, other)
    assert not out.exists()


def test_backup_keeps_the_source_permissions(broken, tmp_path):
    source = tmp_path / "src" / broken.name
    source.parent.mkdir()
    source.write_bytes(broken.read_bytes())
    source.chmod(0o640)
    saved = backup_checkpoint(source, tmp_path / "backup")
    assert saved.path.stat().st_mode & 0o777 == 0o640


@pytest.mark.slow
def test_fixed_run_resumes_with_base_rows_restored_or_kept(tiny_project, make_train_config, tmp_path):
    """A decay-shrunk fixed run: by default its base rows go back to the base; keep_base_rows keeps the shrink
    and makes it the new lineage's base."""
    p = tiny_project
    project = Project(p.base_checkpoint, p.base_config, p.tokenizer, p.train_manifest)
    fixed = community_run(project, tmp_path / "fixed", 25000)[-1]
    base = upstream_keys_of(torch_load(p.base_checkpoint), "base")
    b = base["text_embedding.weight"].shape[0] - 1
    shrunk = torch_load(fixed)["model"]["text_embedding.weight"][:b]
    assert not torch.equal(shrunk, base["text_embedding.weight"][:b])
    hashes = {}
    for keep in (False, True):
        out = tmp_path / f"keep{keep}"
        tc = make_train_config(p, out, max_steps=25002, val_interval=100, save_interval=100)
        run = experimental_resume(fixed, tc, text_loss_threshold=float("inf"), keep_base_rows=keep)
        assert run.result.status == "completed" and run.result.step == 25002
        lineage = torch_load(run.result.checkpoint)["lineage"]
        lineage_base = upstream_keys_of(torch_load(lineage["base_checkpoint"]), "lineage base")
        assert torch.equal(lineage_base["text_embedding.weight"][:b], shrunk if keep else base["text_embedding.weight"][:b])
        assert run.repair["moments_zeroed"]["text_embedding.weight.exp_avg"] == 0  # a fixed run: nothing to zero
        assert ("base_rows" in run.repair) == keep
        hashes[keep] = lineage["base_rows_sha256"]
    assert hashes[True] != hashes[False]
