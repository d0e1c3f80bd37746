"""Base checkpoints in, upstream-layout checkpoints out.

A base `gpt.pth` is a plain state_dict (or `{'model': ...}`, as the community trainers save it).
Tensors the training path does not use (conditioning encoders, perceivers, emotion projections)
pass through untouched from base to export.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import GPTConfig
from trainer.errors import FidelError
from trainer.model import SPLIT_KEYS, UnifiedVoiceGPT, is_training_path_key, upstream_state_dict

DROPPED_PREFIXES = ("inference_model.",)
DROPPED_KEYS = ("gpt.wte.weight",)


def torch_load(path: str | Path) -> object:
    """`torch.load` with weights_only=True; every failure becomes one FidelError line."""
    path = Path(path)
    if not path.is_file():
        raise FidelError(path, "checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise FidelError(path, f"refused to load: not a plain-tensor checkpoint ({first[:160]})") from exc
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FidelError(path, f"unreadable or truncated checkpoint ({first[:160]})") from exc


def upstream_keys_of(raw: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The UnifiedVoice state_dict inside a plain or community checkpoint, minus what upstream drops."""
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FidelError(path, "no UnifiedVoice state_dict found (expected a plain state_dict or {'model': ...})")
    return {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES) and k not in DROPPED_KEYS}


@dataclass
class BaseCheckpoint:
    path: Path
    training: dict[str, torch.Tensor]  # upstream names, training path only
    passthrough: dict[str, torch.Tensor]  # everything else, exported unchanged
    key_order: list[str]  # the base file's key order, kept on export

    @property
    def text_rows(self) -> int:
        return self.training["text_embedding.weight"].shape[0]

    @property
    def base_rows(self) -> int:
        """B: base tokens. The checkpoint has B+1 text rows (the N+1 rule)."""
        return self.text_rows - 1


def load_base_checkpoint(path: str | Path, cfg: GPTConfig) -> BaseCheckpoint:
    """Load a base checkpoint and check it against the config, naming the keys that disagree."""
    path = Path(path)
    state = upstream_keys_of(torch_load(path), path)
    training = {k: v for k, v in state.items() if is_training_path_key(k)}
    passthrough = {k: v for k, v in state.items() if not is_training_path_key(k)}
    expected = expected_training_shapes(cfg.with_text_tokens(training_text_tokens(training, path)))
    missing = sorted(set(expected) - set(training))
    unexpected = sorted(set(training) - set(expected))
    wrong = sorted(k for k in expected if k in training and tuple(training[k].shape) != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), (
                "shape differs from config", [f"{k} {tuple(training[k].shape)} != {expected[k]}" for k in wrong]))
            if keys)
        raise FidelError(path, f"does not match the config: {detail}")
    return BaseCheckpoint(path, training, passthrough, list(state))


def training_text_tokens(training: dict[str, torch.Tensor], path: str | Path) -> int:
    emb = training.get("text_embedding.weight")
    if emb is None or emb.ndim != 2:
        raise FidelError(path, "missing key text_embedding.weight")
    return emb.shape[0] - 1


def expected_training_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    d, rows, mel = cfg.model_dim, cfg.text_rows, cfg.number_mel_codes
    shapes = {
        "text_embedding.weight": (rows, d),
        "mel_embedding.weight": (mel, d),
        "mel_pos_embedding.emb.weight": (cfg.mel_positions, d),
        "text_pos_embedding.emb.weight": (cfg.text_positions, d),
        "final_norm.weight": (d,), "final_norm.bias": (d,),
        "text_head.weight": (rows, d), "text_head.bias": (rows,),
        "mel_head.weight": (mel, d), "mel_head.bias": (mel,),
        "speed_emb.weight": (2, d),
        "gpt.ln_f.weight": (d,), "gpt.ln_f.bias": (d,),
    }
    for i in range(cfg.layers):
        p = f"gpt.h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,),
        })
    return shapes


def tensor_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_rows_hash(emb: torch.Tensor, head_w: torch.Tensor, head_b: torch.Tensor, base_rows: int) -> str:
    """sha256 of rows 0..B-1 of text_embedding, text_head.weight and text_head.bias."""
    return tensor_sha256(emb[:base_rows], head_w[:base_rows], head_b[:base_rows])


def model_base_rows_hash(model: UnifiedVoiceGPT) -> str:
    return tensor_sha256(model.text_embedding.base, model.text_head.base_weight, model.text_head.base_bias)


def base_checkpoint_rows_hash(base: BaseCheckpoint, base_rows: int) -> str:
    t = base.training
    return base_rows_hash(t["text_embedding.weight"], t["text_head.weight"], t["text_head.bias"], base_rows)


def export_state_dict(model: UnifiedVoiceGPT, base: BaseCheckpoint, dtype: torch.dtype | None = None) -> dict:
    """Upstream's key set in the base file's order: trained tensors plus pass-through tensors."""
    trained = upstream_state_dict(model)
    out = {}
    for key in base.key_order:
        out[key] = trained[key] if key in trained else base.passthrough[key]
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


__all__ = [
    "BaseCheckpoint", "SPLIT_KEYS", "base_checkpoint_rows_hash", "base_rows_hash", "export_state_dict",
    "expected_training_shapes", "load_base_checkpoint", "model_base_rows_hash", "tensor_sha256", "torch_load",
    "upstream_keys_of",
]
