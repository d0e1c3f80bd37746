"""What the layer above hands the training loop (TrainHooks) and gets back from it (TrainResult)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fidel_tts.trainer.model.gpt import UnifiedVoiceGPT
from fidel_tts.trainer.training.build import ForeignResume


@dataclass
class TrainHooks:
    """Callbacks for the layer above (Prefect/MLflow); trainer/ itself logs nowhere. Only rank 0 calls them."""

    # after every check and before anything is written: the layer above takes the output dir (fidel train: a lock)
    on_claim: Callable[[Path], None] = lambda output_dir: None
    on_start: Callable[[dict], None] = lambda info: None
    # metrics are committed together with the checkpoint that contains them, so a resume never logs a step twice
    on_commit: Callable[[list[tuple[int, dict]]], None] = lambda rows: None
    on_checkpoint: Callable[[Path, dict], None] = lambda path, sidecar: None
    on_progress: Callable[[int, int, dict], None] = lambda step, total, metrics: None
    on_warning: Callable[[str], None] = lambda message: print(f"warning: {message}", file=sys.stderr)
    # --resume FILE of another trainer's checkpoint: the fidel checkpoint to resume from instead (fidel train
    # passes the community import, trainer.checkpoints.experimental.community_resume); None refuses such a file
    on_foreign_resume: ForeignResume | None = None
    # evaluation gates at each validation: return a reason to stop (training saves and ends "failed"), or None
    on_validation: Callable[[int, dict, list[dict], UnifiedVoiceGPT], str | None] = \
        lambda step, metrics, history, model: None


@dataclass
class TrainResult:
    status: str  # completed | preempted | failed
    step: int
    total_steps: int
    checkpoint: Path | None
    lineage: dict
    val_history: list[dict] = field(default_factory=list)
    last_train: dict = field(default_factory=dict)
    reason: str = ""
    resumed_from: int | None = None
    wall_seconds: float = 0.0  # the training loop alone (saves and validation included)
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped on overflow
