"""`fidel export`: a plain state_dict with upstream's key set, order and shapes (text rows N+1), next to the
tokenizer and a config with number_text_tokens updated; base rows and pass-through tensors byte-identical to
the base file; optional fp16; nothing overwritten; drifted or foreign bases refused."""

import json
from pathlib import Path

import pytest
import torch
from fidel_tts.flows.cli import main as fidel
from fidel_tts.trainer.checkpoints.export import export_model
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.config import gpt_config_from_dict, load_gpt_config, read_config_yaml
from fidel_tts.trainer.model.gpt import (
    SPLIT_KEYS,
    UnifiedVoiceGPT,
    load_upstream_state_dict,
    upstream_state_dict,
)
from fidel_tts.trainer.model.weights import read_state_dict, same_bytes, upstream_layout
from fidel_tts.trainer.text.tokenizer import load_tokenizer
from fidel_tts.trainer.training.checkpoint import list_checkpoints
from fidel_tts.trainer.training.trainer import train

from tests.fixtures.layout_fixture import SMALL_CONDITIONING, write_layout_fixture
from tests.fixtures.synthetic import tiny_config_dict


@pytest.fixture
def full_layout_project(tiny_project, tmp_path):
    """The tiny project with a base that has upstream's whole layout (conditioning encoders included)."""
    base_size = load_tokenizer(tiny_project.base_tokenizer).get_piece_size()
    gpt = {**tiny_config_dict(base_size)["gpt"], **SMALL_CONDITIONING}
    fixture = write_layout_fixture(tmp_path / "base", gpt, seed=1)
    return tiny_project, fixture, gpt


def trained(project, fixture, make_train_config, out: Path, **overrides) -> Path:
    settings = dict(base_checkpoint=str(fixture.checkpoint), config=str(fixture.config), max_steps=4,
                    save_interval=4, val_interval=4, weight_decay=0.1)
    result = train(make_train_config(project, out, **{**settings, **overrides}))
    assert result.status == "completed", result.reason
    return list_checkpoints(out)[0]


def test_export_is_upstreams_layout_with_the_base_bytes_kept(full_layout_project, make_train_config, tmp_path,
                                                              capsys):
    project, fixture, gpt = full_layout_project
    checkpoint = trained(project, fixture, make_train_config, tmp_path / "run")
    out = tmp_path / "export"
    assert fidel(["export", str(checkpoint), "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)

    exported = torch.load(out / "gpt.pth", weights_only=True)  # a plain state_dict of tensors
    base = torch.load(fixture.checkpoint, weights_only=True)
    pieces = load_tokenizer(project.tokenizer).get_piece_size()
    cfg = gpt_config_from_dict(gpt).with_text_tokens(pieces)
    assert [(k, tuple(v.shape)) for k, v in exported.items()] == list(upstream_layout(cfg, gpt).items())
    assert list(exported) == list(base)
    b = len(base["text_embedding.weight"]) - 1
    for key, value in exported.items():
        assert value.dtype == torch.float32
        if key in SPLIT_KEYS:
            assert value.shape[0] == pieces + 1
            assert same_bytes(value[:b], base[key][:b])
            assert not torch.equal(value[b:b + 1], base[key][b:b + 1])  # row B re-initialised, then trained
        elif not key.startswith(("gpt.", "mel_", "text_", "final_norm", "speed_emb")):
            assert same_bytes(value, base[key]), key  # conditioning and emotion projections pass through
    assert not torch.equal(exported["gpt.h.0.attn.c_attn.weight"], base["gpt.h.0.attn.c_attn.weight"])

    config = read_config_yaml(out / "config.yaml")
    assert config["gpt"] == {**gpt, "number_text_tokens": pieces}
    assert {k: v for k, v in config.items() if k != "gpt"} == {
        k: v for k, v in read_config_yaml(fixture.config).items() if k != "gpt"}
    assert (out / "bpe.model").read_bytes() == Path(project.tokenizer).read_bytes()
    assert record["number_text_tokens"] == pieces and record["keys"] == len(base) and record["dtype"] == "float32"
    assert "byte-identical" in record["checked"] and record["init"]["method"] == "subtoken"

    model = UnifiedVoiceGPT(load_gpt_config(out / "config.yaml").with_text_tokens(pieces), base_rows=b)
    load_upstream_state_dict(model, {k: v for k, v in exported.items() if k in upstream_state_dict(model)})


def test_fp16_export_halves_every_tensor(full_layout_project, make_train_config, tmp_path):
    project, fixture, _ = full_layout_project
    checkpoint = trained(project, fixture, make_train_config, tmp_path / "run")
    full = export_model(checkpoint, tmp_path / "fp32")
    half = export_model(checkpoint, tmp_path / "fp16", fp16=True)
    a, b = read_state_dict(full.gpt), read_state_dict(half.gpt)
    assert list(a) == list(b) and all(v.dtype == torch.float16 for v in b.values())
    assert all(torch.equal(a[k].half(), b[k]) for k in a)
    assert half.record["dtype"] == "float16" and half.gpt.stat().st_size < 0.6 * full.gpt.stat().st_size


def test_export_never_overwrites(full_layout_project, make_train_config, tmp_path):
    project, fixture, _ = full_layout_project
    checkpoint = trained(project, fixture, make_train_config, tmp_path / "run")
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.yaml").write_text("mine")
    with pytest.raises(FidelError, match="already holds config.yaml"):
        export_model(checkpoint, out)
    assert (out / "config.yaml").read_text() == "mine" and not (out / "gpt.pth").exists()


def test_a_moved_base_is_found_and_a_different_base_refused(full_layout_project, make_train_config, tmp_path):
    project, fixture, gpt = full_layout_project
    checkpoint = trained(project, fixture, make_train_config, tmp_path / "run")
    moved = tmp_path / "moved.pth"
    fixture.checkpoint.rename(moved)
    with pytest.raises(FidelError, match="checkpoint not found"):
        export_model(checkpoint, tmp_path / "a")
    assert export_model(checkpoint, tmp_path / "b", base_checkpoint=moved).record["base_checkpoint"] == str(moved)
    other = write_layout_fixture(tmp_path / "other", gpt, seed=2)
    with pytest.raises(FidelError, match="not its base"):
        export_model(checkpoint, tmp_path / "c", base_checkpoint=other.checkpoint)


def test_hooks_mode_drifts_so_its_export_is_refused(full_layout_project, make_train_config, tmp_path):
    project, fixture, _ = full_layout_project
    checkpoint = trained(project, fixture, make_train_config, tmp_path / "run", freeze="hooks")
    sidecar = json.loads(checkpoint.with_suffix(".json").read_text())
    assert sidecar["freeze"] == "hooks" and sidecar["base_rows_intact"] is False
    with pytest.raises(FidelError, match="drifted .*--freeze hooks"):
        export_model(checkpoint, tmp_path / "export")
    assert not (tmp_path / "export" / "gpt.pth").exists()


def test_train_cli_passes_freeze_duration_control_and_init(monkeypatch, tmp_path):
    import fidel_tts.trainer.training.trainer as train_module
    from fidel_tts.trainer.training.hooks import TrainResult

    seen = {}

    def fake_train(tc, hooks=None):
        seen["tc"] = tc
        return TrainResult("completed", 0, 0, None, {})

    monkeypatch.setattr(train_module, "train", fake_train)
    assert fidel(["train", "--train-manifest", "t.jsonl", "--val-manifest", "v.jsonl", "--output-dir",
                  str(tmp_path), "--freeze", "hooks", "--duration-control", "--init", "subtoken"]) == 0
    tc = seen["tc"]
    assert (tc.freeze, tc.duration_control, tc.init) == ("hooks", True, "subtoken")
    assert fidel(["train", "--train-manifest", "t", "--val-manifest", "v", "--init", "zeros"]) == 2


def test_a_from_scratch_model_exports_its_training_path(tiny_project, make_train_config, tmp_path):
    """The demo's base is trained from scratch: its export is upstream's training-path keys, N+1 text rows."""
    train(make_train_config(tiny_project, tmp_path / "run", base_checkpoint=None, max_steps=2, save_interval=2))
    exported = export_model(list_checkpoints(tmp_path / "run")[0], tmp_path / "export", fp16=True)
    state = read_state_dict(exported.gpt)
    pieces = load_tokenizer(tiny_project.tokenizer).get_piece_size()
    cfg = load_gpt_config(tiny_project.base_config).with_text_tokens(pieces)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == list(upstream_layout(cfg).items())
    assert all(v.dtype == torch.float16 for v in state.values()) and exported.record["base_rows"] == 0


def fake_release(folder: Path, fixture) -> Path:
    """An IndexTTS2 release folder's shape: its three replaced files and others the export must keep as they are."""
    folder.mkdir(parents=True)
    for name in ("gpt.pth", "bpe.model", "config.yaml"):
        (folder / name).write_bytes(b"official " + name.encode())
    (folder / "s2mel.pth").write_bytes(b"s2mel weights")
    (folder / "feat1.pt").write_bytes(b"emotion matrix")
    (folder / "qwen0.6bemo4-merge").mkdir()
    (folder / "qwen0.6bemo4-merge" / "config.json").write_text("{}")
    return folder


def folder_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_with_a_release_is_a_complete_model_folder_and_the_release_is_only_read(
        full_layout_project, make_train_config, tmp_path, capsys):
    project, fixture, _ = full_layout_project
    checkpoint = trained(project, fixture, make_train_config, tmp_path / "run")
    release = fake_release(tmp_path / "release", fixture)
    before = folder_bytes(release)
    out = tmp_path / "model"
    assert fidel(["export", str(checkpoint), "--out", str(out), "--release", str(release)]) == 0
    capsys.readouterr()

    assert folder_bytes(release) == before
    assert sorted(folder_bytes(out)) == sorted(["gpt.pth", "bpe.model", "config.yaml", "export.json", "fidel.json",
                                                "s2mel.pth", "feat1.pt", "qwen0.6bemo4-merge/config.json"])
    assert (out / "s2mel.pth").read_bytes() == before["s2mel.pth"]
    assert (out / "gpt.pth").read_bytes() != before["gpt.pth"]
    record = json.loads((out / "fidel.json").read_text())
    assert record["release_files_sha256"]["s2mel.pth"] == file_sha256(release / "s2mel.pth")
    assert set(record["release_files_sha256"]) == {"s2mel.pth", "feat1.pt", "qwen0.6bemo4-merge/config.json"}
    assert record["exported_sha256"]["gpt.pth"] == file_sha256(out / "gpt.pth")
    assert record["lineage"]["checkpoint_sha256"] and "FidelTextTokenizer" in record["normaliser"]
    assert "fidel speak --model" in record["run"]["fidel"]


def test_an_export_into_its_release_is_refused_before_any_work(full_layout_project, make_train_config, tmp_path,
                                                                capsys):
    project, fixture, _ = full_layout_project
    checkpoint = trained(project, fixture, make_train_config, tmp_path / "run")
    release = fake_release(tmp_path / "release", fixture)
    before = folder_bytes(release)
    assert fidel(["export", str(checkpoint), "--out", str(release / "mine"), "--release", str(release)]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "never written to" in line
    assert folder_bytes(release) == before
    assert fidel(["export", str(checkpoint), "--out", str(tmp_path / "m"), "--release", str(tmp_path / "nope")]) == 2
    assert "--release is not a folder" in capsys.readouterr().err and not (tmp_path / "m").exists()
