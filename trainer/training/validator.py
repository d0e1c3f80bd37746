"""When to validate, the validation history and its best point, and the evaluation gates run at each validation.

Validation runs every `val_interval` steps (default: once an epoch), at the last step, and once before the first
step (the start point that "validation improves" compares against). The best is the lowest weighted loss; its
checkpoint is kept with keep_best. A gate (TrainHooks.on_validation, rank 0) returns a reason to stop or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fidel_tts.trainer.data.loader import TrainingData
from fidel_tts.trainer.model.gpt import UnifiedVoiceGPT
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.training.checkpoint import checkpoint_path
from fidel_tts.trainer.training.distributed import any_rank
from fidel_tts.trainer.training.metrics import evaluate
from fidel_tts.trainer.training.options import TrainConfig


@dataclass
class Validator:
    tc: TrainConfig
    env: Dist
    device: torch.device
    dtype: torch.dtype | None
    model: UnifiedVoiceGPT
    data: TrainingData
    every: int
    total_steps: int
    on_validation: Callable[[int, dict, list[dict], UnifiedVoiceGPT], str | None]
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    gate_failure: str | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def validate(self, step: int) -> tuple[dict, bool]:
        """The validation metrics, and whether they are the best so far (worth keeping a checkpoint of)."""
        metrics = evaluate(self.model, self.data.val_set, self.data.val_batches, self.device, self.dtype, self.env)
        self.history.append({"step": step, **metrics})
        self.gate_failure = self.on_validation(step, metrics, self.history, self.model) if self.env.main else None
        loss = self.tc.text_loss_weight * metrics["val_text_loss"] + self.tc.mel_loss_weight * metrics["val_mel_loss"]
        is_best = self.best is None or loss < self.best["loss"]
        if is_best:
            self.best = {"step": step, "loss": loss, "path": str(checkpoint_path(Path(self.tc.output_dir), step))}
        return metrics, is_best

    def gate_stop(self) -> str | None:
        """Why a gate stops training (decided on every rank at once), or None."""
        if not any_rank(self.gate_failure is not None, self.env, self.device):
            return None
        return self.gate_failure or "a gate failed on another rank"
