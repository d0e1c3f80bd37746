"""Optimizer, schedule and precision: AdamW groups built by name, warmup + cosine that never rises again."""

from __future__ import annotations

import math

import torch
from fidel_tts.trainer.model.gpt import UnifiedVoiceGPT
from fidel_tts.trainer.training.options import TrainConfig

NEW_ROW_PARAMS = ("text_embedding.new", "text_head.new_weight", "text_head.new_bias")


def param_groups(model: UnifiedVoiceGPT, learning_rate: float, new_rows_lr: float | None,
                 weight_decay: float) -> list[dict]:
    """New text rows: their own lr, no decay. Matrices of the backbone and heads: decay. Biases, norms and
    embedding tables: no decay. In hooks mode the full text rows form one decayed group, as in the community
    trainers' single AdamW group."""
    new_rows, text_rows, decay, no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if name in NEW_ROW_PARAMS:
            new_rows.append(param)
        elif name.startswith(("text_embedding.", "text_head.")):
            text_rows.append(param)
        elif param.ndim >= 2 and (name.startswith("gpt.") or name.endswith("head.weight")):
            decay.append(param)
        else:
            no_decay.append(param)
    rows_lr = new_rows_lr or learning_rate
    first = ({"name": "text_rows", "params": text_rows, "lr": rows_lr, "weight_decay": weight_decay}
             if text_rows else {"name": "new_rows", "params": new_rows, "lr": rows_lr, "weight_decay": 0.0})
    return [
        first,
        {"name": "decay", "params": decay, "lr": learning_rate, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": learning_rate, "weight_decay": 0.0},
    ]


def make_optimizer(groups: list[dict], device: torch.device) -> torch.optim.AdamW:
    # fused AdamW on CUDA (one kernel for all params); the foreach path elsewhere
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig,
                   schedule_total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, schedule_total, tc.min_lr_ratio))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, cosine decay to min_ratio at `total`, flat after: it never rises again."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with GradScaler); fp32 on CPU."""
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
