"""`fidel speak`: IndexTTS2's own inference (GPT → s2mel → vocoder, from `indextts2-inference`) on an exported
model folder, with fidel's text front end (FidelTextTokenizer) as its tokenizer.

Everything is checked before IndexTTS2 is built: the folder's files, the weights IndexTTS2 takes from the
Hugging Face cache (looked up offline, never downloaded), every GPT key and shape against upstream's
UnifiedVoice (whatever strictness upstream's loader has), and every text against the tokenizer.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fidel_tts.trainer.model.config import read_config_yaml

RELEASE_SOURCE = "hf download IndexTeam/IndexTTS-2 --local-dir checkpoints (README: Using fidel on the real IndexTTS2 model)"
# (repo, file, what) IndexTTS2.__init__ fetches with hf_hub_download / from_pretrained
HUB_WEIGHTS = (
    ("facebook/w2v-bert-2.0", "config.json", "w2v-BERT"),
    ("facebook/w2v-bert-2.0", "preprocessor_config.json", "w2v-BERT"),
    ("facebook/w2v-bert-2.0", "model.safetensors", "w2v-BERT"),
    ("amphion/MaskGCT", "semantic_codec/model.safetensors", "the semantic codec"),
    ("funasr/campplus", "campplus_cn_common.bin", "CAMPPlus"),
)
VOCODER_FILES = ("config.json", "bigvgan_generator.pt")
FOLDER_KEYS = ("gpt_checkpoint", "s2mel_checkpoint", "w2v_stat", "emo_matrix", "spk_matrix", "qwen_emo_path")


@dataclass
class SpeakSettings:
    model: Path
    prompt: Path
    texts: list[str]
    outs: list[Path]
    device: str = "cpu"
    seed: int = 0
    emotion: dict = field(default_factory=dict)  # IndexTTS2.infer's emo_* / use_random keywords


def work_offline() -> None:
    """IndexTTS2 calls hf_hub_download and from_pretrained; offline they read the cache or fail, never fetch.
    huggingface_hub reads the variable once, at import: set its constant too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


def folder_problems(folder: Path, cfg: dict) -> list[str]:
    """One line per file of the model folder that config.yaml names and that is not there (or does not name)."""
    names = {key: cfg.get(key) for key in FOLDER_KEYS} | {"dataset.bpe_model": cfg.get("dataset", {}).get("bpe_model")}
    unnamed = [f"{folder / 'config.yaml'}: names no `{key}` (IndexTTS2's config.yaml does)"
               for key, name in names.items() if not name]
    missing = [f"{folder / str(name)}: not found; from {RELEASE_SOURCE}, or `fidel export --release`"
               for name in names.values() if name and not (folder / str(name)).exists()]
    return unnamed + missing


def hub_problems(cfg: dict) -> list[str]:
    """One line per weight file IndexTTS2 would take from the Hugging Face cache and that is not in it."""
    vocoder = (cfg.get("vocoder") or {}).get("name")
    if not vocoder:
        return ["config.yaml: names no `vocoder.name` (IndexTTS2's config.yaml does)"] + hub_files_missing(HUB_WEIGHTS)
    if Path(vocoder).is_dir():  # BigVGAN.from_pretrained reads a local folder as it is
        return [f"{Path(vocoder) / name}: the BigVGAN vocoder's file is not found"
                for name in VOCODER_FILES if not (Path(vocoder) / name).is_file()] + hub_files_missing(HUB_WEIGHTS)
    return hub_files_missing([*HUB_WEIGHTS, *((vocoder, name, "the BigVGAN vocoder") for name in VOCODER_FILES)])


def hub_files_missing(wanted) -> list[str]:
    from huggingface_hub import try_to_load_from_cache

    return [f"{repo}/{name}: {what} is not in the Hugging Face cache ({hub_cache()}); nothing is downloaded at run "
            f"time: `hf download {repo} {name}` once" for repo, name, what in wanted
            if not isinstance(try_to_load_from_cache(repo, name), str)]


def hub_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


def input_problems(settings: SpeakSettings) -> list[str]:
    """Every bad input, one line each, before anything is built or written."""
    config = settings.model / "config.yaml"
    if not settings.model.is_dir():
        return [f"{settings.model}: --model is not a folder"]
    cfg = read_config_yaml(config)
    problems = folder_problems(settings.model, cfg) + hub_problems(cfg)
    if not settings.prompt.is_file():
        problems.append(f"{settings.prompt}: --prompt not found")
    problems += [f"{out}: --out already exists; choose a new file" for out in settings.outs if out.exists()]
    return problems


def gpt_key_problem(folder: Path, cfg: dict) -> str | None:
    """The GPT's state_dict against upstream UnifiedVoice's, strictly: the first missing, extra or misshaped key."""
    from indextts.gpt.model_v2 import UnifiedVoice

    path = folder / cfg["gpt_checkpoint"]
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state = state.get("model", state)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in UnifiedVoice(**cfg["gpt"]).state_dict().items()}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    for what, keys in (("lacks", missing), ("has extra", extra), ("has a misshaped", misshaped)):
        if keys:
            return f"{path}: {what} key {keys[0]} ({len(keys)} such) for config.yaml's UnifiedVoice; not loaded"
    return None


def text_problems(folder: Path, cfg: dict, texts: list[str]) -> list[str]:
    """A text the front end cannot read fully: it would turn those characters into <unk>, so it is refused."""
    from fidel_tts.trainer.text.normalize import FidelTextTokenizer

    tokenizer = FidelTextTokenizer(folder / cfg["dataset"]["bpe_model"])
    problems = []
    for number, text in enumerate(texts, 1):
        pieces = tokenizer.tokenize(text)
        unknown = [p for p, i in zip(pieces, tokenizer.convert_tokens_to_ids(pieces)) if i == tokenizer.unk_token_id]
        if not text.strip() or not pieces:
            problems.append(f"--text {number}: empty after fidel's normalisation")
        elif unknown:
            problems.append(f"--text {number}: {len(unknown)} piece(s) the tokenizer does not know "
                            f"({' '.join(unknown[:5])}): the front end would read them as <unk>; not spoken")
    return problems


def check_model(settings: SpeakSettings) -> list[str]:
    work_offline()
    problems = input_problems(settings)
    if problems:
        return problems
    cfg = read_config_yaml(settings.model / "config.yaml")
    key_problem = gpt_key_problem(settings.model, cfg)
    return [key_problem] if key_problem else text_problems(settings.model, cfg, settings.texts)


def load_tts(folder: Path, device: str):
    """IndexTTS2 built from the folder as it is, fidel's front end installed as its tokenizer."""
    from fidel_tts.trainer.text.normalize import FidelTextTokenizer
    from indextts.infer_v2 import IndexTTS2

    work_offline()
    tts = IndexTTS2(model_dir=str(folder), cfg_path=str(folder / "config.yaml"), device=device)
    tts.tokenizer = FidelTextTokenizer(tts.bpe_path)
    return tts


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def speak(tts, settings: SpeakSettings) -> list[tuple[Path, float]]:
    """Each text through IndexTTS2.infer (seeded per text); [(wav, seconds)]. infer returns upstream's own 16-bit
    samples, written here with soundfile: upstream's torchaudio.save needs torchcodec, which it does not install."""
    import soundfile as sf

    spoken = []
    for text, out in zip(settings.texts, settings.outs):
        seed_everything(settings.seed)
        rate, samples = tts.infer(str(settings.prompt), text, None, **settings.emotion)
        sf.write(str(out), samples, rate, subtype="PCM_16")
        spoken.append((out, len(samples) / rate))
    return spoken
