"""When a checkpoint is due, what it holds, and what follows once it is durable.

A save is due every `save_interval` steps, at the last step, after `save_minutes` without one, at a new best
validation (with keep_best), and when a stop is asked for (a signal on any rank, or a failed gate). Only rank 0
writes, in the background (writer.py); once the write is on disk the old checkpoints are pruned (the newest
always stays), the metrics logged since the previous save are committed with it, and the layer above is told.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model.gpt import UnifiedVoiceGPT
from fidel_tts.trainer.model.weights import model_base_rows_hash
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.training.build import load_trainable, recorded_config, trainable_state
from fidel_tts.trainer.training.checkpoint import Saved, prune_checkpoints, rng_state, set_rng_state
from fidel_tts.trainer.training.distributed import any_ranks
from fidel_tts.trainer.training.options import TrainConfig
from fidel_tts.trainer.training.step import Position
from fidel_tts.trainer.training.writer import AsyncCheckpointWriter


@dataclass
class Restored:
    """What a checkpoint hands back to the loop beyond the weights and optimizer state it loads in place."""

    position: Position = field(default_factory=Position)
    val_history: list[dict] = field(default_factory=list)
    best: dict | None = None
    skipped_steps: int = 0
    committed_rows: list = field(default_factory=list)  # replayed: a kill may have come between save and commit


@dataclass
class Checkpointer:
    tc: TrainConfig
    env: Dist
    device: torch.device
    model: UnifiedVoiceGPT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    lineage: dict
    total_steps: int
    last_saved: Path | None = None
    on_commit: Callable[[list[tuple[int, dict]]], None] = lambda rows: None  # TrainHooks'
    on_checkpoint: Callable[[Path, dict], None] = lambda path, sidecar: None
    pending: list[tuple[int, dict]] = field(default_factory=list)  # metrics not yet committed with a checkpoint

    def __post_init__(self):
        self.out = Path(self.tc.output_dir)
        self.last_save_time = time.monotonic()
        self.writer = AsyncCheckpointWriter(background=self.tc.async_save)

    def restore(self, saved: dict) -> Restored:
        load_trainable(self.model, saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        return Restored(Position(saved["step"], saved["epoch"], saved["position"]), list(saved["val_history"]),
                        saved.get("best"), saved.get("skipped_steps", 0), saved.get("committed_rows", []))

    def record(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def decide(self, step: int, stop_requested: bool, gate_stop: bool, is_best: bool) -> tuple[str | None, bool]:
        """Why to save now (None: no save is due), and whether training stops at this step (on every rank)."""
        tc = self.tc
        overdue = bool(tc.save_minutes) and time.monotonic() - self.last_save_time >= tc.save_minutes * 60
        requested, overdue = any_ranks([stop_requested, overdue], self.env, self.device)
        stopping = requested or gate_stop
        due = (step % tc.save_interval == 0 or step == self.total_steps or stopping or overdue
               or (is_best and tc.keep_best))
        return ("gate" if gate_stop else "signal" if stopping else "interval") if due else None, stopping

    def save(self, reason: str, pos: Position, val_history: list[dict], best: dict | None, skipped: int) -> None:
        self.last_save_time = time.monotonic()
        if not self.env.main:
            return
        base_intact = model_base_rows_hash(self.model) == self.lineage["base_rows_sha256"]
        if not base_intact and self.tc.freeze == "split":
            raise FidelError(self.tc.base_checkpoint, "base rows differ from the base checkpoint at save: "
                                                      "refusing to save")
        state = self.state(pos, val_history, best, skipped)
        sidecar = self.sidecar(reason, pos, val_history, base_intact)
        keep = {Path(best["path"])} if best and self.tc.keep_best else set()
        rows = list(self.pending)
        self.pending.clear()
        self.writer.submit(self.out, pos.step, state, sidecar, on_done=lambda saved: self.durable(saved, rows, keep))

    def state(self, pos: Position, val_history: list[dict], best: dict | None, skipped: int) -> dict:
        return {
            "model": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": pos.step, "epoch": pos.epoch, "position": pos.micro, "accumulation_counter": 0,
            "rng": rng_state(), "lineage": self.lineage, "val_history": val_history, "best": best,
            "skipped_steps": skipped, "train_config": recorded_config(self.tc),
            "committed_rows": list(self.pending),  # replayed on resume in case a kill falls between save and commit
        }

    def sidecar(self, reason: str, pos: Position, val_history: list[dict], base_intact: bool) -> dict:
        lineage = self.lineage
        return {"epoch": pos.epoch, "sampler": {"epoch": pos.epoch, "position": pos.micro, "seed": self.tc.seed},
                "lineage_id": lineage["id"], "base_rows_sha256": lineage["base_rows_sha256"],
                "tokenizer_sha256": lineage["tokenizer_sha256"], "config_sha256": lineage["config_sha256"],
                "freeze": lineage["freeze"], "init": lineage["init"], "reason": reason,
                "base_rows_intact": base_intact, "mlflow_run_id": lineage["mlflow_run_id"],
                "total_steps": self.total_steps, "schedule_total_steps": lineage["schedule_total_steps"],
                "metrics": val_history[-1] if val_history else {},
                "imported": lineage.get("imported")}  # a community checkpoint the lineage started from

    def durable(self, saved: Saved, rows: list[tuple[int, dict]], keep: set[Path]) -> None:
        """Runs on the loop's thread once the write is on disk: the metrics commit with it."""
        prune_checkpoints(self.out, self.tc.keep_last, keep)
        self.on_commit(rows)
        self.on_checkpoint(saved.path, saved.sidecar)
        self.last_saved = saved.path

    def poll(self) -> None:
        self.writer.poll()

    def commit_unsaved(self) -> None:
        """A failed run keeps the evidence of its failure, though no checkpoint of its broken state is written."""
        if self.pending:
            self.on_commit(list(self.pending))
