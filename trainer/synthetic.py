"""A tiny, fully generated project for tests and benchmarks: tokenizers, config, base checkpoint, features
and paired manifests, in seconds and with no audio. Codes are a deterministic function of the text, so a
model can actually learn them and losses fall."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.config import GPTConfig, gpt_config_from_dict, write_config_yaml
from trainer.model import UnifiedVoiceGPT, upstream_state_dict
from trainer.tokenizer import encode, extend_tokenizer, load_tokenizer, train_base_tokenizer

AMHARIC_WORDS = (
    "ሰላም ዓለም እንዴት ነህ ነሽ ቤት ልጅ ውሃ ዳቦ ቡና ሻይ ገበያ ትምህርት ቤተሰብ ሀገር ከተማ መንገድ መኪና በር መስኮት "
    "ጠረጴዛ ወንበር መጽሐፍ ብዕር ወረቀት ሰማይ ፀሐይ ጨረቃ ኮከብ ዝናብ ነፋስ ተራራ ወንዝ ባህር ዛፍ አበባ ፍሬ ወተት "
    "ስጋ ዓሳ እንጀራ ወጥ ጤና ፍቅር ሰላምታ ደስታ ሥራ ገንዘብ ጊዜ ቀን ሌሊት ጠዋት ማታ ዛሬ ነገ ትናንት አንድ ሁለት ሦስት"
).split()
ENGLISH_WORDS = (
    "the a and of to in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look"
).split()


@dataclass
class TinyProject:
    root: Path
    base_tokenizer: Path
    tokenizer: Path
    base_config: Path
    base_checkpoint: Path
    train_manifest: Path
    val_manifest: Path
    am_texts: list[str]
    cfg: GPTConfig

    def flow_settings(self, output_dir: Path, tracking_uri: str, max_steps: int = 30, **train) -> dict:
        """Settings for the fine-tune flow on this project: fast steps, frequent validation and saves."""
        return {
            "train_manifests": [str(self.train_manifest)], "val_manifests": [str(self.val_manifest)],
            "tokenizer": str(self.tokenizer), "base_tokenizer": str(self.base_tokenizer),
            "config": str(self.base_config), "base_checkpoint": str(self.base_checkpoint),
            "output_dir": str(output_dir), "tracking_uri": tracking_uri,
            "train": {"max_steps": max_steps, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 5,
                      "log_interval": 5, "val_interval": 10, "save_interval": 10, **train},
        }


def sentences(words: tuple[str, ...] | list[str], n: int, rng: random.Random, end: str) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + end for _ in range(n)]


def codes_for(ids: list[int], codebook: int, rng: np.random.Generator) -> np.ndarray:
    """3-5 codes per text token, a fixed pattern per token id, plus a little noise: learnable, not trivial."""
    out = []
    for token in ids:
        pattern = [(token * 7 + k * 13) % codebook for k in range(3 + token % 3)]
        out.extend(pattern)
    codes = np.array(out, dtype=np.int32)
    noise = rng.random(len(codes)) < 0.05
    codes[noise] = rng.integers(0, codebook, noise.sum())
    return codes


def write_pairs(root: Path, name: str, texts: list[str], speakers: list[str], sp, cfg: GPTConfig,
                seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "features"
    folder.mkdir(parents=True, exist_ok=True)
    speaker_vec = {s: rng.normal(size=(32, cfg.model_dim)).astype(np.float32) * 0.5 for s in speakers}
    records = []
    for i, text in enumerate(texts):
        speaker = speakers[i % len(speakers)]
        uid = f"{name}{i:05d}"
        ids = np.array(encode(sp, text), dtype=np.int32)
        codes = codes_for(ids.tolist(), cfg.number_mel_codes - 2, rng)
        cond = speaker_vec[speaker] + rng.normal(size=(32, cfg.model_dim)).astype(np.float32) * 0.05
        emo = cond.mean(0)
        for kind, array in (("ids", ids), ("codes", codes), ("cond", cond), ("emo", emo)):
            np.save(folder / f"{uid}.{kind}.npy", array)
        records.append({
            "id": f"{uid}__p{uid}", "speaker": speaker, "language": "am", "prompt_id": f"p{uid}",
            "prompt_condition_path": f"features/{uid}.cond.npy", "prompt_condition_len": 32,
            "prompt_emo_vec_path": f"features/{uid}.emo.npy", "target_id": uid, "target_text": text,
            "target_text_ids_path": f"features/{uid}.ids.npy", "target_text_len": len(ids),
            "target_codes_path": f"features/{uid}.codes.npy", "target_code_len": len(codes),
            "target_duration": round(len(codes) / 50, 3),
        })
    manifest = root / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return manifest


def tiny_config_dict(number_text_tokens: int, dim: int = 32, layers: int = 2, heads: int = 2,
                     codebook: int = 64) -> dict:
    return {
        "gpt": {
            "model_dim": dim, "max_mel_tokens": 300, "max_text_tokens": 80, "heads": heads,
            "use_mel_codes_as_input": True, "mel_length_compression": 1024, "layers": layers,
            "number_text_tokens": number_text_tokens, "number_mel_codes": codebook + 2,
            "start_mel_token": codebook, "stop_mel_token": codebook + 1, "start_text_token": 0,
            "stop_text_token": 1, "train_solo_embeddings": False, "condition_type": "conformer_perceiver",
        },
        "dataset": {"bpe_model": "bpe.model", "sample_rate": 24000},
        "gpt_checkpoint": "gpt.pth",
        "version": "2.0",
    }


def make_tiny_project(root: Path, n_train: int = 48, n_val: int = 12, seed: int = 0, dim: int = 32,
                      layers: int = 2) -> TinyProject:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    english = [s.upper() for s in sentences(ENGLISH_WORDS, 300, rng, ".")]
    amharic = sentences(AMHARIC_WORDS, n_train + n_val + 200, rng, "።")
    base_tok = train_base_tokenizer(english, root / "base_bpe.model", vocab_size=90)
    base_size = load_tokenizer(base_tok).get_piece_size()
    tokenizer = root / "bpe.model"
    extend_tokenizer(base_tok, amharic, tokenizer, target_size=base_size + 120)
    sp = load_tokenizer(tokenizer)
    raw = tiny_config_dict(base_size, dim=dim, layers=layers)
    base_config = write_config_yaml(raw, root / "config.yaml")
    base_cfg = gpt_config_from_dict(raw["gpt"])
    torch.manual_seed(seed)
    base_model = UnifiedVoiceGPT(base_cfg, base_rows=0)
    base_checkpoint = root / "gpt.pth"
    torch.save(upstream_state_dict(base_model), base_checkpoint)
    cfg = base_cfg.with_text_tokens(sp.get_piece_size())
    speakers = [f"spk{i}" for i in range(4)]
    train = write_pairs(root, "train", amharic[:n_train], speakers, sp, cfg, seed)
    val = write_pairs(root, "val", amharic[n_train:n_train + n_val], speakers, sp, cfg, seed + 1)
    return TinyProject(root, base_tok, tokenizer, base_config, base_checkpoint, train, val, amharic, cfg)
