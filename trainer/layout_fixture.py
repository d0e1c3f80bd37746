"""A random-weight checkpoint with exactly upstream's UnifiedVoice layout, plus its config.yaml, for tests.

At the release config it is the official `gpt.pth`'s layout: 665 keys, 871,100,639 values, 12001 text rows
(reference/indextts2_gpt_state_dict.json). The same generator writes that layout at small dims for fast tests.

Values are cheap: one pool of normal(0, 0.02) draws, copied into each tensor from a different offset. The pool
length is prime, so no two rows of a matrix repeat each other, and 3.5 GB fill at memory speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import gpt_config_from_dict, write_config_yaml
from trainer.weights import upstream_layout

# config.yaml `gpt:` section of the IndexTTS2 release (reference/indextts2_config_gpt.md §1)
RELEASE_GPT: dict = {
    "model_dim": 1280, "max_mel_tokens": 1815, "max_text_tokens": 600, "heads": 20,
    "use_mel_codes_as_input": True, "mel_length_compression": 1024, "layers": 24,
    "number_text_tokens": 12000, "number_mel_codes": 8194, "start_mel_token": 8192, "stop_mel_token": 8193,
    "start_text_token": 0, "stop_text_token": 1, "train_solo_embeddings": False,
    "condition_type": "conformer_perceiver",
    "condition_module": {"output_size": 512, "linear_units": 2048, "attention_heads": 8, "num_blocks": 6,
                         "input_layer": "conv2d2", "perceiver_mult": 2},
    "emo_condition_module": {"output_size": 512, "linear_units": 1024, "attention_heads": 4, "num_blocks": 4,
                             "input_layer": "conv2d2", "perceiver_mult": 2},
}

# the same layout at toy size: dims small enough that a test builds, trains and exports it in a second
SMALL_CONDITIONING: dict = {
    "condition_type": "conformer_perceiver",
    "condition_module": {"output_size": 8, "linear_units": 16, "attention_heads": 2, "num_blocks": 2,
                         "input_layer": "conv2d2", "perceiver_mult": 2},
    "emo_condition_module": {"output_size": 8, "linear_units": 16, "attention_heads": 2, "num_blocks": 1,
                             "input_layer": "conv2d2", "perceiver_mult": 2},
}

POOL_SIZE = 1_048_573  # prime
STD = 0.02


@dataclass
class LayoutFixture:
    checkpoint: Path
    config: Path
    keys: int
    values: int


def config_dict(gpt: dict) -> dict:
    return {"gpt": dict(gpt), "dataset": {"bpe_model": "bpe.model", "sample_rate": 24000},
            "gpt_checkpoint": "gpt.pth", "version": "2.0"}


def value_pool(seed: int) -> torch.Tensor:
    return torch.randn(POOL_SIZE, generator=torch.Generator().manual_seed(seed)) * STD


def filled(shape: tuple[int, ...], pool: torch.Tensor, offset: int) -> torch.Tensor:
    """A new tensor of `shape` holding the pool's values from `offset` on, wrapping around."""
    out = torch.empty(shape)
    flat = out.view(-1)
    done, start = 0, offset % len(pool)
    while done < flat.numel():
        take = min(len(pool) - start, flat.numel() - done)
        flat[done:done + take].copy_(pool[start:start + take])
        done, start = done + take, 0
    return out


def layout_state_dict(gpt: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with upstream's keys, order and shapes for this `gpt:` section, and random-looking values."""
    layout = upstream_layout(gpt_config_from_dict(gpt), gpt)
    pool = value_pool(seed)
    state, offset = {}, 0
    for name, shape in layout.items():
        state[name] = filled(shape, pool, offset)
        offset += 7919 * (len(state)) + 1  # a different start per tensor
    return state


def write_layout_fixture(folder: str | Path, gpt: dict | None = None, seed: int = 0) -> LayoutFixture:
    """folder/gpt.pth (a plain state_dict, as the official file) and folder/config.yaml. Default: full size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gpt = dict(RELEASE_GPT if gpt is None else gpt)
    state = layout_state_dict(gpt, seed)
    keys, values = len(state), sum(t.numel() for t in state.values())
    checkpoint = folder / "gpt.pth"
    torch.save(state, checkpoint)
    del state
    config = write_config_yaml(config_dict(gpt), folder / "config.yaml")
    return LayoutFixture(checkpoint, config, keys, values)
