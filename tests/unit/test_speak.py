"""`fidel speak`: every input checked before IndexTTS2 is built — the model folder's files, the weights taken
from the Hugging Face cache (offline), every GPT key against upstream's UnifiedVoice, every text against the
tokenizer — each problem one line, exit 2, nothing written."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from fidel_tts.flows.cli import main as fidel
from fidel_tts.trainer.evaluation.speak import gpt_key_problem, hub_problems, text_problems
from fidel_tts.trainer.model.config import read_config_yaml

BPE = Path(__file__).parents[1] / "data" / "bpe.model"
from tests.unit.test_export import fake_release, full_layout_project, trained  # noqa: F401 - the fixture

SNAPSHOT = "0" * 40

def hub_folder(cache: Path, repo: str) -> Path:
    """A snapshot folder in the Hugging Face cache layout, as hf_hub_download leaves it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    snap = root / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True, exist_ok=True)
    return snap

def s2mel_section():
    return {"preprocess_params": {"sr": 22050, "spect_params": {"n_fft": 1024, "win_length": 1024, "hop_length": 256,
                                                                 "n_mels": 80, "fmin": 0, "fmax": "None"}},
            "dit_type": "DiT", "reg_loss_type": "l1", "style_encoder": {"dim": 192},
            "length_regulator": {"channels": 32, "is_discrete": False, "in_channels": 1024,
                                 "content_codebook_size": 64, "sampling_ratios": [1], "vector_quantize": False,
                                 "n_codebooks": 1, "quantizer_dropout": 0.0, "f0_condition": False, "n_f0_bins": 16},
            "DiT": {"hidden_dim": 32, "num_heads": 2, "depth": 1, "class_dropout_prob": 0.1, "block_size": 8192,
                    "in_channels": 80, "style_condition": True, "final_layer_type": "wavenet", "target": "mel",
                    "content_dim": 32, "content_codebook_size": 64, "content_type": "discrete", "f0_condition": False,
                    "n_f0_bins": 16, "content_codebooks": 1, "is_causal": False, "long_skip_connection": True,
                    "zero_prompt_speech_token": False, "time_as_token": False, "style_as_token": False,
                    "uvit_skip_connection": True, "add_resblock_in_transformer": False},
            "wavenet": {"hidden_dim": 32, "num_layers": 1, "kernel_size": 5, "dilation_rate": 1, "p_dropout": 0.2,
                        "style_condition": True}}

def bigvgan_config():
    return {"num_mels": 80, "upsample_rates": [8, 8, 4], "upsample_kernel_sizes": [16, 16, 8],
            "upsample_initial_channel": 32, "resblock": "1", "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]], "activation": "snakebeta", "snake_logscale": True,
            "use_tanh_at_final": False, "use_bias_at_final": False, "sampling_rate": 22050, "hop_size": 256}

def write_standins(folder: Path) -> tuple[Path, Path]:
    """Random-weight stand-ins of every model IndexTTS2.__init__ loads, from upstream's own classes: the release
    folder (GPT, s2mel, stats, emotion matrices, a one-layer Qwen2 emotion model) and an HF cache (w2v-BERT, the
    MaskGCT codec, CAMPPlus); BigVGAN as a local folder, which vocoder.name may name."""
    import sentencepiece
    from fidel_tts.trainer.data.features import tiny_gpt_section, write_tiny_models
    from indextts.gpt.model_v2 import UnifiedVoice
    from indextts.s2mel.modules.bigvgan.bigvgan import BigVGAN
    from indextts.s2mel.modules.bigvgan.env import AttrDict
    from indextts.s2mel.modules.campplus.DTDNN import CAMPPlus
    from indextts.s2mel.modules.commons import MyModel
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    paths = write_tiny_models(folder / "tiny", model_dim=32, codebook=64)
    release, cache = folder / "release", folder / "hf"
    release.mkdir(parents=True)
    w2v = hub_folder(cache, "facebook/w2v-bert-2.0")
    for f in paths.w2v_bert.iterdir():
        shutil.copy(f, w2v / f.name)
    codec = hub_folder(cache, "amphion/MaskGCT") / "semantic_codec"
    codec.mkdir()
    shutil.copy(paths.codec, codec / "model.safetensors")
    torch.save(CAMPPlus(feat_dim=80, embedding_size=192).state_dict(), hub_folder(cache, "funasr/campplus") / "campplus_cn_common.bin")
    voc = folder / "bigvgan"
    voc.mkdir()
    (voc / "config.json").write_text(json.dumps(bigvgan_config()))
    torch.save({"generator": BigVGAN(AttrDict(bigvgan_config())).state_dict()}, voc / "bigvgan_generator.pt")
    cfg = OmegaConf.to_container(OmegaConf.load(paths.checkpoint_dir / "config.yaml"))
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(BPE)).get_piece_size()
    gpt = tiny_gpt_section(1280, 64, pieces)  # s2mel's gpt_layer takes exactly 1280 (upstream hard-codes it)
    gpt["heads"] = 20
    torch.save(UnifiedVoice(**gpt).state_dict(), release / "gpt.pth")
    s2 = s2mel_section()
    torch.save({"net": {k: v.state_dict() for k, v in MyModel(OmegaConf.create(s2), use_gpt_latent=True).models.items()}}, release / "s2mel.pth")
    shutil.copy(paths.checkpoint_dir / "wav2vec2bert_stats.pt", release / "wav2vec2bert_stats.pt")
    torch.save(torch.randn(4, 1280), release / "feat2.pt")
    torch.save(torch.randn(4, 192), release / "feat1.pt")
    qwen = release / "qwen0.6bemo4-merge"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(qwen)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{chr(97 + i): i + 1 for i in range(26)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(qwen)
    shutil.copy(BPE, release / "bpe.model")
    cfg.update(gpt=gpt, s2mel=s2, w2v_stat="wav2vec2bert_stats.pt", s2mel_checkpoint="s2mel.pth", emo_matrix="feat2.pt",
               spk_matrix="feat1.pt", emo_num=[1, 1, 1, 1, 0, 0, 0, 0][:4], qwen_emo_path="qwen0.6bemo4-merge",
               vocoder={"type": "bigvgan", "name": str(voc)}, dataset={"bpe_model": "bpe.model"}, gpt_checkpoint="gpt.pth")
    OmegaConf.save(OmegaConf.create(cfg), release / "config.yaml")
    return release, cache



@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return write_standins(tmp_path_factory.mktemp("standins"))


@pytest.fixture
def hub_cache_of(monkeypatch):
    def use(cache: Path):
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return use


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


def voice(path: Path) -> Path:
    sf.write(path, (0.1 * np.sin(np.arange(22050) * 2 * np.pi * 220 / 22050)).astype("float32"), 22050)
    return path


def test_fidel_speak_gives_the_samples_indextts2_infer_gives_with_the_same_seed_and_tokenizer(
        standins, hub_cache_of, tmp_path, capsys):
    from fidel_tts.trainer.evaluation.speak import load_tts

    release, cache = standins
    hub_cache_of(cache)
    prompt, out = voice(tmp_path / "voice.wav"), tmp_path / "fidel.wav"
    assert fidel(["speak", "--model", str(release), "--text", "hello world.", "--prompt", str(prompt),
                  "--out", str(out), "--seed", "3", "--max-mel-tokens", "20"]) == 0
    printed = capsys.readouterr().out.strip()
    spoken, rate = sf.read(out, dtype="int16")
    assert printed == f"wrote {out} ({len(spoken) / rate:.2f} s)" and rate == 22050 and len(spoken) > 0

    tts = load_tts(release, "cpu")  # the same IndexTTS2 and FidelTextTokenizer, called directly
    torch.manual_seed(3)
    direct_rate, direct = tts.infer(str(prompt), "hello world.", None, max_mel_tokens=20)
    direct = direct[:, 0]
    differ = np.flatnonzero(direct != spoken)
    assert direct_rate == rate and len(direct) == len(spoken) and differ.size == 0, f"first differs at {differ[:1]}"
    torch.manual_seed(4)
    other_seed = tts.infer(str(prompt), "hello world.", None, max_mel_tokens=20)[1][:, 0]
    assert not np.array_equal(other_seed, direct)  # the seed matters: the equality above is not a constant
