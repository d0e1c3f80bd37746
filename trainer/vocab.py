"""Vocabulary surgery: grow text rows from B+1 (base) to N+1 (extended) and initialise the new rows.

Row B is the base model's never-used extra row; the first new token inherits it, so it is
re-initialised like every other new row (design.md §0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from trainer.config import GPTConfig
from trainer.model import SPLIT_KEYS, UnifiedVoiceGPT, load_upstream_state_dict
from trainer.weights import BaseCheckpoint, tensor_sha256

INIT_METHODS = ("mean", "random")


@dataclass
class InitRecord:
    method: str
    seed: int
    base_rows: int
    total_rows: int
    sha256: str  # of the initial new rows, so "new rows moved from init" can be checked later

    def to_dict(self) -> dict:
        return asdict(self)


def new_rows_init(base_emb, base_head_w, base_head_b, new_rows: int, method: str, seed: int):
    """Initial (embedding, head weight, head bias) for the new rows."""
    gen = torch.Generator().manual_seed(seed)
    dim = base_emb.shape[1]
    if method == "random" or base_emb.shape[0] == 0:
        # the community trainers: normal(0, 0.02) embedding, PyTorch's default Linear init for the head
        bound = 1 / math.sqrt(dim)
        emb = torch.randn(new_rows, dim, generator=gen) * 0.02
        head_w = (torch.rand(new_rows, dim, generator=gen) * 2 - 1) * bound
        head_b = (torch.rand(new_rows, generator=gen) * 2 - 1) * bound
        return emb, head_w, head_b
    if method == "mean":
        mean, std = base_emb.mean(0), base_emb.std(0)
        emb = mean + torch.randn(new_rows, dim, generator=gen) * std
        head_w = base_head_w.mean(0).expand(new_rows, dim).clone()
        head_b = base_head_b.mean().expand(new_rows).clone()
        return emb, head_w, head_b
    raise ValueError(f"unknown init method {method!r}; choose from {', '.join(INIT_METHODS)}")


def extended_model(base: BaseCheckpoint, cfg: GPTConfig, base_rows: int, method: str = "mean",
                   seed: int = 0) -> tuple[UnifiedVoiceGPT, InitRecord]:
    """A model with the base weights, base rows frozen, and cfg.text_rows - base_rows new rows initialised."""
    model = UnifiedVoiceGPT(cfg, base_rows)
    t = base.training
    emb, head_w, head_b = (t[k][:base_rows] for k in SPLIT_KEYS)
    new_emb, new_w, new_b = new_rows_init(emb, head_w, head_b, cfg.text_rows - base_rows, method, seed)
    state = dict(t)
    state["text_embedding.weight"] = torch.cat([emb, new_emb.to(emb.dtype)])
    state["text_head.weight"] = torch.cat([head_w, new_w.to(head_w.dtype)])
    state["text_head.bias"] = torch.cat([head_b, new_b.to(head_b.dtype)])
    load_upstream_state_dict(model, state)
    record = InitRecord(method, seed, base_rows, cfg.text_rows, tensor_sha256(new_emb, new_w, new_b))
    return model, record
