"""The training loop: weighted text and mel losses, warmup + cosine, AdamW by name, clipping, optional AMP,
log and validation intervals, atomic checkpoints, exact resume, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.checkpoint import (
    file_sha256,
    latest_valid_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.config import GPTConfig, load_gpt_config
from trainer.data import BucketBatchSampler, PairDataset, collate, read_manifests
from trainer.errors import FidelError
from trainer.model import Batch, UnifiedVoiceGPT
from trainer.tokenizer import load_tokenizer
from trainer.vocab import INIT_METHODS, InitRecord, extended_model
from trainer.weights import base_checkpoint_rows_hash, load_base_checkpoint, model_base_rows_hash

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and resumable
FROZEN_BUFFERS = ("text_embedding.base", "text_head.base_weight", "text_head.base_bias")


@dataclass
class TrainConfig:
    train_manifests: list[str]
    val_manifests: list[str]
    tokenizer: str
    config: str
    output_dir: str
    base_checkpoint: str | None = None  # None: train from scratch with no base rows (the demo's base model)
    resume: str | None = None  # None: fresh; "auto": newest valid checkpoint in output_dir; or a path
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 8
    grad_accumulation: int = 1
    learning_rate: float = 2e-5
    new_rows_lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    text_loss_weight: float = 0.2
    mel_loss_weight: float = 0.8
    log_interval: int = 10
    val_interval: int = 100
    save_interval: int = 100
    keep_last: int = 3
    amp: str = "off"  # off | auto | bf16 | fp16
    init: str = "mean"
    seed: int = 1234
    num_workers: int = 0
    device: str = "auto"
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainHooks:
    """Callbacks for the layer above (Prefect/MLflow); trainer/ itself logs nowhere."""

    on_start: Callable[[dict], None] = lambda info: None
    # metrics are committed together with the checkpoint that contains them, so a resume never logs a step twice
    on_commit: Callable[[list[tuple[int, dict]]], None] = lambda rows: None
    on_checkpoint: Callable[[Path, dict], None] = lambda path, sidecar: None
    on_progress: Callable[[int, int, dict], None] = lambda step, total, metrics: None


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


class StopRequest:
    """First SIGTERM/SIGINT asks for a stop after the current step; a second one exits at once."""

    def __init__(self):
        self.signal: int | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def param_groups(model: UnifiedVoiceGPT, cfg: TrainConfig) -> list[dict]:
    """By name: new text rows get their own lr and no decay; matrices decay; biases, norms, embeddings don't."""
    new_rows, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if name in ("text_embedding.new", "text_head.new_weight", "text_head.new_bias"):
            new_rows.append(param)
        elif param.ndim >= 2 and (name.startswith("gpt.") or name.endswith("head.weight")):
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"name": "new_rows", "params": new_rows, "lr": cfg.new_rows_lr or cfg.learning_rate, "weight_decay": 0.0},
        {"name": "decay", "params": decay, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": cfg.learning_rate, "weight_decay": 0.0},
    ]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, cosine decay to min_ratio at `total`, flat after: it never rises again."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def trainable_state(model: UnifiedVoiceGPT) -> dict:
    return {k: v for k, v in model.state_dict().items() if k not in FROZEN_BUFFERS}


@dataclass
class Setup:
    cfg: GPTConfig
    model: UnifiedVoiceGPT
    base_rows: int
    base_hash: str
    init: InitRecord | None


def build_model(tc: TrainConfig) -> Setup:
    tokenizer = load_tokenizer(tc.tokenizer)
    config = load_gpt_config(tc.config)
    cfg = config.with_text_tokens(tokenizer.get_piece_size())
    if tc.init not in INIT_METHODS:
        raise FidelError(None, f"--init {tc.init!r}: choose from {', '.join(INIT_METHODS)}")
    torch.manual_seed(tc.seed)
    if tc.base_checkpoint is None:
        model = UnifiedVoiceGPT(cfg, base_rows=0)
        return Setup(cfg, model, 0, model_base_rows_hash(model), None)
    base = load_base_checkpoint(tc.base_checkpoint, config)
    base_rows = base.base_rows
    if cfg.number_text_tokens < base_rows:
        raise FidelError(tc.tokenizer, f"has {cfg.number_text_tokens} pieces, fewer than the base's {base_rows}")
    model, init = extended_model(base, cfg, base_rows, tc.init, tc.seed)
    base_hash = base_checkpoint_rows_hash(base, base_rows)
    return Setup(cfg, model, base_rows, base_hash, init)


def resolve_resume(tc: TrainConfig) -> Path | None:
    out = Path(tc.output_dir)
    if tc.resume is None:
        newest, _ = latest_valid_checkpoint(out)
        if newest is not None:
            raise FidelError(out, f"already holds checkpoints (newest {newest.name}); pass --resume auto to "
                                  "continue, or choose a new --output-dir")
        return None
    if tc.resume == "auto":
        newest, _ = latest_valid_checkpoint(out)
        return newest
    return Path(tc.resume)


def lineage_of(tc: TrainConfig, setup: Setup) -> dict:
    return {
        "id": uuid.uuid4().hex,
        "base_checkpoint": tc.base_checkpoint,
        "base_rows": setup.base_rows,
        "text_rows": setup.cfg.text_rows,
        "base_rows_sha256": setup.base_hash,
        "tokenizer_sha256": file_sha256(tc.tokenizer),
        "config_sha256": file_sha256(tc.config),
        "freeze": "split",
        "init": setup.init.to_dict() if setup.init else None,
        "mlflow_run_id": tc.mlflow_run_id,
    }


def check_lineage(saved: dict, fresh: dict, path: Path) -> None:
    for key in ("base_rows_sha256", "tokenizer_sha256", "text_rows"):
        if saved.get(key) != fresh.get(key):
            raise FidelError(path, f"{key} differs from this run's ({saved.get(key)} vs {fresh.get(key)}): "
                                   "not the same lineage")


class MetricWindow:
    """Token-weighted train metrics over one log interval."""

    def __init__(self):
        self.text_ce = self.text_tokens = self.mel_ce = self.mel_tokens = self.mel_correct = 0.0

    def add(self, sums) -> None:
        self.text_ce += sums.text_ce.item()
        self.text_tokens += sums.text_tokens.item()
        self.mel_ce += sums.mel_ce.item()
        self.mel_tokens += sums.mel_tokens.item()
        self.mel_correct += sums.mel_correct.item()

    def result(self, prefix: str) -> dict:
        return {
            f"{prefix}text_loss": self.text_ce / max(1.0, self.text_tokens),
            f"{prefix}mel_loss": self.mel_ce / max(1.0, self.mel_tokens),
            f"{prefix}mel_top1": self.mel_correct / max(1.0, self.mel_tokens),
        }


@torch.no_grad()
def evaluate(model: UnifiedVoiceGPT, loader, device: torch.device, dtype: torch.dtype | None) -> dict:
    was_training = model.training
    model.eval()
    window = MetricWindow()
    for batch in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            window.add(model.loss_sums(batch.to(device)))
    model.train(was_training)
    return window.result("val_")


def train(tc: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    hooks = hooks or TrainHooks()
    out = Path(tc.output_dir)
    resume_path = resolve_resume(tc)
    setup = build_model(tc)
    model = setup.model
    if model_base_rows_hash(model) != setup.base_hash:
        raise FidelError(tc.base_checkpoint, "base rows changed while building the model")
    device = resolve_device(tc.device)
    dtype = amp_dtype(tc.amp, device)
    model.to(device)

    train_pairs = read_manifests(tc.train_manifests)
    val_pairs = read_manifests(tc.val_manifests)
    train_set, val_set = PairDataset(train_pairs), PairDataset(val_pairs)
    sampler = BucketBatchSampler([p.code_len + p.text_len for p in train_pairs], tc.batch_size, seed=tc.seed)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=tc.batch_size, collate_fn=collate)
    batches_per_epoch = len(sampler.epoch_batches(0))
    steps_per_epoch = max(1, batches_per_epoch // tc.grad_accumulation)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    val_every = tc.val_interval or steps_per_epoch  # 0: once per epoch, as the community trainer

    optimizer = torch.optim.AdamW(param_groups(model, tc), betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, total_steps, tc.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    lineage = lineage_of(tc, setup)
    step, epoch, position = 0, 0, 0
    val_history: list[dict] = []
    resumed_from = None
    if resume_path is not None:
        state, meta = load_checkpoint(resume_path)
        check_lineage(state["lineage"], lineage, resume_path)
        lineage = {**state["lineage"], "mlflow_run_id": state["lineage"].get("mlflow_run_id") or tc.mlflow_run_id}
        model.load_state_dict({**state["model"], **{k: v for k, v in model.state_dict().items()
                                                    if k in FROZEN_BUFFERS}})
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        val_history = list(state["val_history"])
        set_rng_state(state["rng"])
        resumed_from = step
    hooks.on_start({"lineage": lineage, "resumed_from": resumed_from, "total_steps": total_steps,
                    "device": str(device), "amp": str(dtype) if dtype else "fp32",
                    "trainable_params": sum(p.numel() for p in model.parameters())})

    pending: list[tuple[int, dict]] = []
    last_saved: Path | None = resume_path

    def save(reason: str) -> Path:
        nonlocal last_saved
        if model_base_rows_hash(model) != lineage["base_rows_sha256"]:
            raise FidelError(tc.base_checkpoint, "base rows differ from the base checkpoint at save: refusing to save")
        state = {
            "model": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "step": step, "epoch": epoch, "position": position, "rng": rng_state(), "lineage": lineage,
            "val_history": val_history, "train_config": tc.to_dict(),
        }
        sidecar = {"epoch": epoch, "sampler": {"epoch": epoch, "position": position, "seed": tc.seed},
                   "lineage_id": lineage["id"], "base_rows_sha256": lineage["base_rows_sha256"],
                   "tokenizer_sha256": lineage["tokenizer_sha256"], "config_sha256": lineage["config_sha256"],
                   "freeze": lineage["freeze"], "init": lineage["init"], "reason": reason,
                   "mlflow_run_id": lineage["mlflow_run_id"], "total_steps": total_steps,
                   "metrics": val_history[-1] if val_history else {}}
        saved = save_checkpoint(out, step, state, sidecar)
        prune_checkpoints(out, tc.keep_last)
        hooks.on_commit(list(pending))
        pending.clear()
        hooks.on_checkpoint(saved.path, saved.sidecar)
        last_saved = saved.path
        return saved.path

    def validate() -> dict:
        metrics = evaluate(model, val_loader, device, dtype)
        val_history.append({"step": step, **metrics})
        pending.append((step, metrics))
        return metrics

    model.train()
    window, last_train = MetricWindow(), {}
    status, reason = "completed", ""
    if step == 0 and not val_history:
        validate()  # the start point "validation improves" compares against
    started = time.monotonic()
    with StopRequest() as stop:
        while step < total_steps and status == "completed":
            batches = sampler.epoch_batches(epoch)
            loader = torch.utils.data.DataLoader(
                train_set, batch_sampler=batches[position:], collate_fn=collate, num_workers=tc.num_workers,
                generator=torch.Generator())  # its own generator: making a loader must not draw from the global RNG
            for batch in loader:
                status, reason = train_step(model, batch, tc, device, dtype, scaler, window)
                position += 1
                if status != "completed":
                    break
                if position % tc.grad_accumulation:
                    continue
                grad_norm = optimizer_step(model, optimizer, scheduler, scaler, tc)
                step += 1
                if step % tc.log_interval == 0 or step == total_steps:
                    last_train = {**window.result("train_"), "lr": scheduler.get_last_lr()[1],
                                  "grad_norm": grad_norm, "epoch": epoch + position / len(batches),
                                  "steps_per_s": step / max(1e-9, time.monotonic() - started)}
                    pending.append((step, last_train))
                    window = MetricWindow()
                    hooks.on_progress(step, total_steps, last_train)
                if step % val_every == 0 or step == total_steps:
                    validate()
                if step % tc.save_interval == 0 or step == total_steps or stop.requested:
                    save("signal" if stop.requested else "interval")
                if stop.requested:
                    status, reason = "preempted", f"stopped by signal {stop.signal}; saved at step {step}"
                    break
                if step >= total_steps:
                    break
            else:
                epoch, position = epoch + 1, 0
    if status == "failed" and pending:
        hooks.on_commit(list(pending))  # keep the evidence of the failure; no checkpoint of a broken state
    return TrainResult(status, step, total_steps, last_saved, lineage, val_history, last_train, reason, resumed_from)


def train_step(model, batch: Batch, tc: TrainConfig, device, dtype, scaler, window: MetricWindow):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        sums = model.loss_sums(batch.to(device, non_blocking=True))
    text_loss, mel_loss = sums.losses()
    loss = (tc.text_loss_weight * text_loss + tc.mel_loss_weight * mel_loss) / tc.grad_accumulation
    if not torch.isfinite(loss):
        return "failed", f"non-finite loss (text {text_loss.item():.4g}, mel {mel_loss.item():.4g})"
    scaler.scale(loss).backward()
    window.add(sums)
    return "completed", ""


def optimizer_step(model, optimizer, scheduler, scaler, tc: TrainConfig) -> float:
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(grad_norm)
