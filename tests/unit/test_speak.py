"""`fidel speak`: every input checked before IndexTTS2 is built — the model folder's files, the weights taken
from the Hugging Face cache (offline), every GPT key against upstream's UnifiedVoice, every text against the
tokenizer — each problem one line, exit 2, nothing written."""

from pathlib import Path

import pytest
import soundfile as sf
import torch
from fidel_tts.flows.cli import main as fidel
from fidel_tts.trainer.evaluation.speak import gpt_key_problem, hub_problems, text_problems
from fidel_tts.trainer.model.config import read_config_yaml

from tests.unit.test_export import fake_release, full_layout_project, trained  # noqa: F401 - the fixture


@pytest.fixture
def model_folder(full_layout_project, make_train_config, tmp_path, capsys):  # noqa: F811
    project, fixture, _ = full_layout_project
    checkpoint = trained(project, fixture, make_train_config, tmp_path / "run")
    out = tmp_path / "model"
    assert fidel(["export", str(checkpoint), "--out", str(out), "--release",
                  str(fake_release(tmp_path / "release", fixture))]) == 0
    capsys.readouterr()
    return out


def speak_args(folder: Path, tmp_path: Path, text: str = "ሰላም") -> list[str]:
    prompt = tmp_path / "voice.wav"
    sf.write(prompt, [0.0] * 16000, 16000)
    return ["speak", "--model", str(folder), "--text", text, "--prompt", str(prompt), "--out", str(tmp_path / "o.wav")]


def test_the_exported_gpt_has_every_key_of_upstreams_unified_voice(model_folder):
    assert gpt_key_problem(model_folder, read_config_yaml(model_folder / "config.yaml")) is None


@pytest.mark.parametrize("corrupt", ["rename", "drop", "reshape"])
def test_a_corrupt_gpt_key_is_one_line(model_folder, corrupt):
    path = model_folder / "gpt.pth"
    state = torch.load(path, weights_only=True)
    if corrupt == "rename":
        state["text_embedding.weigth"] = state.pop("text_embedding.weight")
    elif corrupt == "drop":
        del state["final_norm.weight"]
    else:
        state["final_norm.weight"] = state["final_norm.weight"][:-1]
    torch.save(state, path)
    problem = gpt_key_problem(model_folder, read_config_yaml(model_folder / "config.yaml"))
    expected = {"rename": "lacks key text_embedding.weight", "drop": "lacks key final_norm.weight",
                "reshape": "misshaped key final_norm.weight"}[corrupt]
    assert expected in problem and "\n" not in problem


def test_missing_files_are_one_line_each_and_nothing_is_written(model_folder, tmp_path, capsys):
    (model_folder / "bpe.model").unlink()
    assert fidel(speak_args(model_folder, tmp_path)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert any(line.endswith("bpe.model: not found; from hf download IndexTeam/IndexTTS-2 --local-dir checkpoints "
                             "(README: Using fidel on the real IndexTTS2 model), or `fidel export --release`")
               for line in lines)
    assert any("names no `s2mel_checkpoint`" in line for line in lines)  # this fixture's config is GPT-only
    assert all(line.startswith("error: ") for line in lines) and not (tmp_path / "o.wav").exists()


def test_weights_missing_from_the_hub_cache_name_the_file_and_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    problems = hub_problems({"vocoder": {"name": "nvidia/bigvgan_v2_22khz_80band_256x"}})
    assert [p.split(":")[0] for p in problems] == [
        "facebook/w2v-bert-2.0/config.json", "facebook/w2v-bert-2.0/preprocessor_config.json",
        "facebook/w2v-bert-2.0/model.safetensors", "amphion/MaskGCT/semantic_codec/model.safetensors",
        "funasr/campplus/campplus_cn_common.bin", "nvidia/bigvgan_v2_22khz_80band_256x/config.json",
        "nvidia/bigvgan_v2_22khz_80band_256x/bigvgan_generator.pt"]
    assert not (tmp_path / "empty_cache").exists()


def test_a_text_of_unknown_characters_is_refused_in_one_line(model_folder):
    cfg = read_config_yaml(model_folder / "config.yaml")
    assert text_problems(model_folder, cfg, ["ሰላም"]) == []
    [problem] = text_problems(model_folder, cfg, ["ሰላም", "☃☃ ሰላም"])
    assert problem.startswith("--text 2: ") and "<unk>" in problem and "\n" not in problem


def test_a_local_vocoder_folder_is_checked_there(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    vocoder = tmp_path / "bigvgan"
    vocoder.mkdir()
    (vocoder / "config.json").write_text("{}")
    problems = hub_problems({"vocoder": {"name": str(vocoder)}})
    assert f"{vocoder / 'bigvgan_generator.pt'}: the BigVGAN vocoder's file is not found" in problems
    assert not any(str(vocoder / "config.json") in p for p in problems)
