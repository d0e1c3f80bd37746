"""A fixed community run (AmV2's trainer with the hooks and weight decay, 25k steps) that triage says to resume is
resumed: by the flow's training stage and by `fidel train --resume FILE`. The import keeps the community step and
new rows, restores the decay-shrunk base rows to the base, happens once, and leaves the user's file as it was. A
run triage does not resume stops with one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fidel_tts.trainer.checkpoints.triage import Reference
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.weights import torch_load
from fidel_tts.trainer.training.checkpoint import list_checkpoints, read_sidecar

from tests.fixtures.community_run import Project, TrainerFlags, community_run

STEP = 25000


def community_project(p) -> Project:
    return Project(p.base_checkpoint, p.base_config, p.tokenizer, p.train_manifest)


@pytest.fixture(scope="module")
def fixed(tiny_project_template, tmp_path_factory) -> Path:
    """model_step25000.pth of a fixed run: hooks, AdamW lr 2e-5, wd 0.01 (base rows shrunk ×0.997)."""
    return community_run(community_project(tiny_project_template), tmp_path_factory.mktemp("fixed"), STEP)[-1]


@pytest.fixture(scope="module")
def broken(tiny_project_template, tmp_path_factory) -> Path:
    """The run without the hooks (AmV2 before 729908f): base rows moved by gradients."""
    flags = TrainerFlags(learning_rate=3e-3, warmup_steps=1, save_interval=2)
    return community_run(community_project(tiny_project_template), tmp_path_factory.mktemp("broken"), 2, flags,
                         version="cf31c91")[-1]


def check_import(out: Path, fixed: Path, project) -> dict:
    """The import at the community step: new rows are the community run's, base rows the base's, notes said."""
    imported = out / f"ckpt-step{STEP:08d}.pt"
    sidecar = read_sidecar(imported)
    state = torch_load(imported)
    community = torch_load(fixed)["model"]
    ref = Reference.load(project.base_checkpoint, project.tokenizer)
    b = ref.base_rows
    assert torch.equal(state["model"]["text_embedding.new"], community["text_embedding.weight"][b:])
    assert torch.equal(state["model"]["text_head.new_weight"], community["text_head.weight"][b:])
    assert not torch.equal(community["text_embedding.weight"][:b], ref.base["text_embedding.weight"][:b])  # shrunk
    note = sidecar["imported"]
    assert note["source_sha256"] == file_sha256(fixed) and note["policy"] == "resume"
    assert note["rows_restored"]["text_embedding.weight"] == b
    assert note["base_rows"].startswith(f"base rows restored to the base: {b}/{b} embedding rows")
    assert note["schedule"].startswith(f"LR schedule restarted over the 2 steps from {STEP} to {STEP + 2}: 5 warmup "
                                       "steps, then cosine")
    assert sidecar["base_rows_sha256"] == ref.base_hash and sidecar["base_rows_intact"]
    return sidecar


def check_continued(out: Path, fixed: Path, project, lineage_id: str, step: int) -> None:
    """The newest checkpoint continues the imported lineage, its base rows bit-identical to the base's."""
    newest = list_checkpoints(out)[0]
    sidecar = read_sidecar(newest)
    assert sidecar["step"] == step and sidecar["lineage_id"] == lineage_id
    assert sidecar["imported"]["from"] == str(fixed) and sidecar["imported"]["base_rows"].startswith("base rows restored")
    assert sidecar["base_rows_intact"]
    assert sidecar["base_rows_sha256"] == Reference.load(project.base_checkpoint).base_hash


def test_the_flow_imports_a_fixed_community_run_once_and_continues_it(tiny_project, fixed, tmp_path, monkeypatch):
    """Triage and training as the flow runs them; a kill right after the import, then the same run again."""
    import fidel_tts.tasks.report
    import fidel_tts.tasks.train
    from fidel_tts.tasks.data import data_checks
    from fidel_tts.tasks.spec import run_spec_from_dict
    from fidel_tts.tasks.train import resume_checkpoint, training
    from fidel_tts.tasks.triage import checkpoint_triage

    # outside a flow run, artifacts would start Prefect's temporary server: not what is tested here
    monkeypatch.setattr(fidel_tts.tasks.report, "create_markdown_artifact", lambda *args, **kwargs: None)
    monkeypatch.setattr(fidel_tts.tasks.train, "create_progress_artifact", lambda *args, **kwargs: None)
    before = file_sha256(fixed)
    out = tmp_path / "out"

    def spec(max_steps: int):
        settings = tiny_project.flow_settings(out, "sqlite:///unused.db", max_steps=max_steps, save_interval=1)
        return run_spec_from_dict({**settings, "resume": str(fixed)})

    data = data_checks.fn(spec(STEP + 2), None)
    decision = checkpoint_triage.fn(spec(STEP + 2), None)
    assert decision["action"] == "resume" and decision["candidates"][0]["kind"] == "foreign"
    tc = spec(STEP + 2).train_config(Path(data["data_dir"]))
    imported = Path(resume_checkpoint(decision, tc, None))  # ... and the process is killed here
    sidecar = check_import(out, fixed, tiny_project)
    imported_sha = file_sha256(imported)

    result = training.fn(spec(STEP + 2), data["data_dir"], checkpoint_triage.fn(spec(STEP + 2), None), None)
    assert result.status == "completed" and result.resumed_from == STEP and result.step == STEP + 2
    assert file_sha256(imported) == imported_sha  # not imported again
    check_continued(out, fixed, tiny_project, sidecar["lineage_id"], STEP + 2)

    result = training.fn(spec(STEP + 3), data["data_dir"], checkpoint_triage.fn(spec(STEP + 3), None), None)
    assert result.resumed_from == STEP + 2 and result.step == STEP + 3  # the newest fidel checkpoint, no rewind
    check_continued(out, fixed, tiny_project, sidecar["lineage_id"], STEP + 3)
    assert file_sha256(fixed) == before


def train_args(project, out: Path, resume: Path, max_steps: int) -> list[str]:
    return ["train", "--train-manifest", str(project.train_manifest), "--val-manifest", str(project.val_manifest),
            "--tokenizer", str(project.tokenizer), "--config", str(project.base_config),
            "--base-checkpoint", str(project.base_checkpoint), "--output-dir", str(out), "--resume", str(resume),
            "--max-steps", str(max_steps), "--batch-size", "8", "--learning-rate", "3e-3", "--warmup-steps", "5",
            "--val-interval", "100", "--save-interval", "1", "--keep-last", "10"]


def test_fidel_train_resume_of_a_fixed_community_run(tiny_project, fixed, tmp_path, capsys):
    from fidel_tts.flows.cli import main

    before = file_sha256(fixed)
    out = tmp_path / "out"
    assert main(train_args(tiny_project, out, fixed, STEP + 2)) == 0
    printed = capsys.readouterr()
    assert f"saved {out / f'ckpt-step{STEP + 1:08d}.pt'} (step {STEP + 1})" in printed.out
    assert f"imported {fixed.name} (step {STEP})" in printed.err and "LR schedule restarted" in printed.err
    sidecar = check_import(out, fixed, tiny_project)
    check_continued(out, fixed, tiny_project, sidecar["lineage_id"], STEP + 2)

    assert main(train_args(tiny_project, out, fixed, STEP + 3)) == 0  # the same command, later: no second import
    assert "was imported into" in capsys.readouterr().err
    check_continued(out, fixed, tiny_project, sidecar["lineage_id"], STEP + 3)
    assert read_sidecar(out / f"ckpt-step{STEP:08d}.pt")["sha256"] == sidecar["sha256"]
    assert file_sha256(fixed) == before


def test_fidel_train_resume_of_a_broken_run_stops_and_writes_nothing(tiny_project, broken, tmp_path, capsys):
    from fidel_tts.flows.cli import main

    listing = sorted(p.name for p in broken.parent.iterdir())
    before = file_sha256(broken)
    out = tmp_path / "out"
    assert main(train_args(tiny_project, out, broken, 10)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {broken}: triage: fresh, not resumable: base rows moved by "
                                               "gradients (trained without the fix)")
    assert err[0].endswith("drop --resume to start fresh from the base")
    assert not out.exists()
    assert sorted(p.name for p in broken.parent.iterdir()) == listing and file_sha256(broken) == before


def test_fidel_train_resume_refuses_what_triage_refuses(tiny_project, fixed, tmp_path, capsys):
    """Another vocabulary, a truncated file, a pruned export, a pickle that runs code, --max-steps not beyond the
    run, another lineage in the output dir: one line each."""
    from fidel_tts.flows.cli import main

    from tests.fixtures.community_run import prune_export
    from tests.unit.test_triage import Payload

    out = tmp_path / "out"
    other_vocab = train_args(tiny_project, out, fixed, STEP + 1)
    other_vocab[other_vocab.index("--tokenizer") + 1] = str(tiny_project.base_tokenizer)
    truncated = tmp_path / "model_step9000.pth"
    truncated.write_bytes(fixed.read_bytes()[:200_000])
    pruned = prune_export(fixed, tmp_path / "gpt_pruned.pth", "float16")
    marker, hostile = tmp_path / "owned", tmp_path / "latest.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "step": Payload(marker)}, hostile)
    cases = [(other_vocab, "triage: refuse, not resumable: vocabulary rows do not match the tokenizer"),
             (train_args(tiny_project, out, truncated, STEP + 1), "triage: quarantine, not resumable: unreadable or truncated"),
             (train_args(tiny_project, out, pruned, STEP + 1), "triage: fresh, not resumable: weights only"),
             (train_args(tiny_project, out, hostile, STEP + 1), "triage: hostile, not resumable: refused: the pickle"),
             (train_args(tiny_project, out, fixed, STEP), f"checkpoint is at step {STEP}: give --max-steps beyond it")]
    for args, expected in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
        assert not out.exists()
    assert not marker.exists()

    fresh = train_args(tiny_project, out, fixed, 1)  # another lineage in the output dir: never continued in its place
    assert main(fresh[:fresh.index("--resume")] + fresh[fresh.index("--resume") + 2:]) == 0
    listing = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(train_args(tiny_project, out, fixed, STEP + 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints of another lineage" in err[0]
    assert sorted(p.name for p in out.iterdir()) == listing
