"""The training loop as parts in order: check and build, restore, validate the start point, then steps until the
schedule ends, a gate fails, a step is not finite, or a signal asks for a stop (saved; the same command resumes).

Weighted text and mel losses, warmup + cosine, AdamW by name, clipping and optional AMP are in step.py and
optim.py; when to save and what a checkpoint holds in checkpointer.py; when to validate and the gates in
validator.py; the checks made before any work and the lineage in build.py.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
from fidel_tts.trainer.data.loader import training_data
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model.weights import model_base_rows_hash
from fidel_tts.trainer.process import StopRequest, resolve_device
from fidel_tts.trainer.training.build import (
    apply_batch_change,
    build_model,
    check_base_tokenizer,
    check_free_space,
    check_lineage,
    check_output_dir,
    check_resume_inputs,
    check_rows,
    effective_batch,
    lineage_of,
    resume_on_every_rank,
    with_default_base_tokenizer,
)
from fidel_tts.trainer.training.checkpoint import load_checkpoint, remove_stale_temp_files
from fidel_tts.trainer.training.checkpointer import Checkpointer, Restored
from fidel_tts.trainer.training.distributed import init_from_env
from fidel_tts.trainer.training.hooks import TrainHooks, TrainResult
from fidel_tts.trainer.training.metrics import MetricWindow, NonFiniteWatch
from fidel_tts.trainer.training.optim import amp_dtype, make_optimizer, make_scheduler, param_groups
from fidel_tts.trainer.training.options import TrainConfig
from fidel_tts.trainer.training.step import (
    LossModel,
    accumulate,
    fp16_scale,
    micro_batch_loader,
    optimizer_step,
    rank_micro_batches,
    skips_on_device,
)
from fidel_tts.trainer.training.validator import Validator
from fidel_tts.trainer.training.writer import AsyncCheckpointWriter

Outcome = tuple[str, str]  # (status, reason) of a loop that ends before the schedule does


def train(tc: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    return Trainer(tc, hooks).run()


class Trainer:
    def __init__(self, tc: TrainConfig, hooks: TrainHooks | None = None):
        hooks = hooks or TrainHooks()
        self.tc = tc
        self.env = init_from_env("cuda" if tc.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.hooks = hooks if self.env.main else TrainHooks(on_warning=hooks.on_warning)
        self.device = resolve_device(tc.device, self.env)
        self.dtype = amp_dtype(tc.amp, self.device)
        self.out = Path(tc.output_dir)

    def run(self) -> TrainResult:
        resume_path = self.check_and_build()
        saved = self.load(resume_path)
        self.build_optimizer()
        self.checkpointer = Checkpointer(self.tc, self.env, self.device, self.model, self.optimizer, self.scheduler,
                                         self.scaler, self.lineage, self.total_steps, resume_path,
                                         self.hooks.on_commit, self.hooks.on_checkpoint)
        restored = self.restore(saved)
        del saved  # loaded into the model and optimizer: its copy of the tensors goes before training starts
        self.hooks.on_start(self.start_info())
        if restored.committed_rows:
            self.hooks.on_commit(restored.committed_rows)  # the layer above drops what it already logged
        self.model.train()
        outcome = self.validate_start()
        self.started, self.steps_at_start = time.monotonic(), self.pos.step
        with StopRequest() as stop, writer_drained(self.checkpointer.writer):
            while outcome is None and self.pos.step < self.total_steps:
                outcome = self.run_epoch(stop)
        status, reason = outcome or ("completed", "")
        if status == "failed":
            self.checkpointer.commit_unsaved()
        return TrainResult(status, self.pos.step, self.total_steps, self.checkpointer.last_saved, self.lineage,
                           self.validator.history, self.last_train, reason, self.resumed_from,
                           time.monotonic() - self.started, int(self.skipped))

    def check_and_build(self) -> Path | None:
        """Every check that can refuse the run, before anything is written; then the model on its device."""
        self.tc = tc = with_default_base_tokenizer(self.tc, self.hooks.on_warning)
        env = self.env
        check_output_dir(self.out)
        resume_path = resume_on_every_rank(tc, env, self.device, self.hooks.on_warning, self.hooks.on_foreign_resume)
        check_base_tokenizer(tc)
        # the model-level inputs (tokenizer against base, config against checkpoint) before any row: a wrong one
        # is named itself, not through the first row it makes look wrong
        self.setup = build_model(tc)
        if resume_path is not None:
            check_resume_inputs(resume_path, tc, self.setup)
        check_free_space(self.out, self.setup.model)
        # the Parquet dataset of `fidel data build` (its tokenizer must be this run's) or paired JSONL manifests
        self.data = training_data(tc.train_manifests, tc.val_manifests, tc.batch_size, tc.seed,
                                  tokenizer=tc.tokenizer, max_tokens=tc.batch_tokens)
        check_rows(self.data, self.setup.cfg)
        if env.main:
            self.hooks.on_claim(self.out)
            remove_stale_temp_files(self.out)
        self.model = self.setup.model.to(self.device)
        if model_base_rows_hash(self.model) != self.setup.base_hash:
            raise FidelError(tc.base_checkpoint, "base rows changed while building the model")
        if tc.compile:
            self.model.compile_blocks()
        self.group = env.world * tc.grad_accumulation  # micro-batches of one optimizer step, all ranks
        self.steps_per_epoch = max(1, len(self.data.sampler.epoch_batches(0)) // self.group)
        self.total_steps = tc.max_steps or tc.epochs * self.steps_per_epoch
        return resume_path

    def load(self, resume_path: Path | None) -> dict | None:
        """The checkpoint resumed from (None: a fresh run), checked to be this run's lineage, whose lineage then
        carries on (its id, its schedule length)."""
        self.lineage = lineage_of(self.tc, self.setup, self.env, self.total_steps)
        if resume_path is None:
            return None
        saved, _ = load_checkpoint(resume_path)
        check_lineage(saved["lineage"], self.lineage, resume_path)
        self.lineage = {**self.lineage, **saved["lineage"]}
        self.lineage["mlflow_run_id"] = self.lineage.get("mlflow_run_id") or self.tc.mlflow_run_id
        return saved

    def build_optimizer(self) -> None:
        tc, device = self.tc, self.device
        groups = param_groups(self.model, tc.learning_rate, tc.new_rows_lr, tc.weight_decay)
        self.optimizer = make_optimizer(groups, device)
        self.scheduler = make_scheduler(self.optimizer, tc, self.lineage["schedule_total_steps"])
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.wrapped = LossModel(self.model)
        if self.env.enabled:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.wrapped, device_ids=[device.index] if device.type == "cuda" else None)

    def restore(self, saved: dict | None) -> Restored:
        """The saved state into model, optimizer, schedule, scaler and RNG; the position, history and best."""
        restored = Restored() if saved is None else self.checkpointer.restore(saved)
        self.pos = restored.position
        self.resumed_from = None if saved is None else self.pos.step
        if saved is not None and self.lineage["effective_batch"] != effective_batch(self.tc, self.env):
            self.pos.micro = apply_batch_change(self.lineage, self.tc, self.env, self.pos.epoch, self.pos.step,
                                                self.pos.micro, saved["train_config"], self.data,
                                                self.hooks.on_warning)
        self.validator = Validator(self.tc, self.env, self.device, self.dtype, self.model, self.data,
                                   self.tc.val_interval or self.steps_per_epoch, self.total_steps,
                                   self.hooks.on_validation, restored.val_history, restored.best)
        self.skipped = torch.tensor(restored.skipped_steps, device=self.device)  # on the device: no sync per step
        self.window, self.last_train = MetricWindow(self.device), {}
        self.watch = NonFiniteWatch(self.device, self.env, on_device=skips_on_device(self.optimizer))
        return restored

    def start_info(self) -> dict:
        return {"lineage": self.lineage, "resumed_from": self.resumed_from, "total_steps": self.total_steps,
                "device": str(self.device), "amp": str(self.dtype) if self.dtype else "fp32", "world": self.env.world,
                "trainable_params": sum(p.numel() for p in self.model.parameters()), "data": self.data.info}

    def validate_start(self) -> Outcome | None:
        """A fresh run validates before its first step; a gate that fails there stops it at once."""
        if self.pos.step != 0 or self.validator.history:
            return None
        self.validate()
        reason = self.validator.gate_stop()
        return ("failed", reason) if reason else None

    def validate(self) -> bool:
        metrics, is_best = self.validator.validate(self.pos.step)
        self.checkpointer.record(self.pos.step, metrics)
        return is_best

    def run_epoch(self, stop: StopRequest) -> Outcome | None:
        """The steps left in this epoch's plan; advances to the next epoch when the plan runs out."""
        plan = self.data.sampler.epoch_batches(self.pos.epoch)
        accum = self.tc.grad_accumulation
        mine = list(rank_micro_batches(plan, self.pos.micro, self.group, accum, self.env))
        loader = micro_batch_loader(self.data.train_set, [ids for _, ids in mine], self.tc, self.device)
        for first in range(0, len(mine), accum):
            micro = [(mine[first + a][0], next(loader)) for a in range(accum)]
            outcome = self.train_step(micro, len(plan), stop)
            if outcome is not None or self.pos.step >= self.total_steps:
                return outcome
        self.pos.epoch, self.pos.micro = self.pos.epoch + 1, 0
        return None

    def train_step(self, micro: list, plan_len: int, stop: StopRequest) -> Outcome | None:
        tc, pos = self.tc, self.pos
        losses = accumulate(self.wrapped, micro, tc, pos.epoch, self.device, self.dtype, self.scaler, self.window,
                            self.env)
        scale_before = fp16_scale(self.scaler)
        grad_norm = optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, tc, self.watch, losses,
                                   pos.step + 1)
        if scale_before is not None:
            self.skipped += fp16_scale(self.scaler) < scale_before
        pos.step += 1
        pos.micro += self.group
        self.checkpointer.poll()
        log_due = pos.step % tc.log_interval == 0 or pos.step == self.total_steps
        val_due = self.validator.due(pos.step)
        # the device path reads the watch only where the loop syncs anyway: no host sync in between
        if (not self.watch.on_device or log_due or val_due) and (failure := self.watch.failure()):
            return "failed", failure
        if log_due:
            self.log_train(grad_norm, plan_len)
        is_best = val_due and self.validate()
        return self.save_or_stop(stop, is_best, self.validator.gate_stop() if val_due else None)

    def log_train(self, grad_norm: torch.Tensor, plan_len: int) -> None:
        pos, elapsed = self.pos, max(1e-9, time.monotonic() - self.started)
        self.last_train = {**self.window.result("train_", self.env), "lr": self.scheduler.get_last_lr()[1],
                           "grad_norm": float(grad_norm), "epoch": pos.epoch + pos.micro / max(1, plan_len),
                           "skipped_steps": int(self.skipped), "steps_per_s": (pos.step - self.steps_at_start) / elapsed}
        self.checkpointer.record(pos.step, self.last_train)
        self.window = MetricWindow(self.device)
        self.hooks.on_progress(pos.step, self.total_steps, self.last_train)

    def save_or_stop(self, stop: StopRequest, is_best: bool, gate_failure: str | None) -> Outcome | None:
        reason, stopping = self.checkpointer.decide(self.pos.step, stop.requested, gate_failure is not None, is_best)
        if reason is not None:
            if failure := self.watch.failure():  # never save the state after a non-finite step
                return "failed", failure
            self.checkpointer.save(reason, self.pos, self.validator.history, self.validator.best, int(self.skipped))
        if gate_failure is not None:
            return "failed", gate_failure
        if stopping:
            by = f"signal {stop.signal}" if stop.requested else "a signal to another rank"
            return "preempted", f"stopped by {by}; saved at step {self.pos.step}"
        return None


@contextmanager
def writer_drained(writer: AsyncCheckpointWriter):
    """Leave the loop (normally, on a stop or on an error) only once the checkpoint in flight is durable."""
    try:
        yield writer
    finally:
        writer.wait()
