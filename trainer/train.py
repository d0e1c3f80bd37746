"""The training loop: weighted text and mel losses, warmup + cosine, AdamW by name, clipping, optional AMP,
log and validation intervals, atomic checkpoints, exact resume, a clean stop on SIGTERM/SIGINT, and DDP.

One optimizer step consumes `world × grad_accumulation` micro-batches of the epoch's shuffled plan. The loss
is normalised by the tokens of all of them (counted on every rank, summed across ranks), so a step is the
same whether its micro-batches run in sequence, in parallel, or both. Dropout is seeded per micro-batch from
(seed, epoch, micro-batch index), so it too does not depend on how the step is split, nor on a resume.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.async_checkpoint import AsyncCheckpointWriter
from trainer.checkpoint import (
    file_sha256,
    latest_valid_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    rng_state,
    set_rng_state,
    verify_checkpoint,
)
from trainer.config import GPTConfig, load_gpt_config, read_config_yaml
from trainer.data import collate, training_data
from trainer.distributed import (
    EXIT_PREEMPTED,  # noqa: F401 - the CLI's and flow's exit code for a saved, resumable stop
    Dist,
    all_reduce_sum,
    any_rank,
    any_ranks,
    from_rank0,
    init_from_env,
)
from trainer.errors import FidelError
from trainer.model import Batch, UnifiedVoiceGPT
from trainer.optim import amp_dtype, lr_factor, make_optimizer, param_groups
from trainer.options import TrainConfig
from trainer.tokenizer import check_base_pieces, load_model_proto, load_tokenizer
from trainer.vocab import InitRecord, extended_model
from trainer.weights import base_checkpoint_rows_hash, load_base_checkpoint, model_base_rows_hash

FROZEN_BUFFERS = ("text_embedding.base", "text_head.base_weight", "text_head.base_bias")


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


def resolve_device(name: str, env: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    return device


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
    torch.manual_seed(tc.seed)
    if tc.base_checkpoint is None:
        model = UnifiedVoiceGPT(cfg, base_rows=0, freeze=tc.freeze, duration_control=tc.duration_control,
                                activation_checkpointing=tc.activation_checkpointing)
        return Setup(cfg, model, 0, model_base_rows_hash(model), None)
    base = load_base_checkpoint(tc.base_checkpoint, config, read_config_yaml(tc.config)["gpt"])
    base_rows = base.base_rows
    if cfg.number_text_tokens < base_rows:
        raise FidelError(tc.tokenizer, f"has {cfg.number_text_tokens} pieces, fewer than the base's {base_rows}")
    model, init = extended_model(base, cfg, base_rows, tc.init, tc.seed, tokenizer, tc.freeze, tc.duration_control)
    model.set_activation_checkpointing(tc.activation_checkpointing)
    base_hash = base_checkpoint_rows_hash(base, base_rows)
    return Setup(cfg, model, base_rows, base_hash, init)


def resolve_resume(tc: TrainConfig, warn: Callable[[str], None] = lambda message: None) -> Path | None:
    out = Path(tc.output_dir)
    if tc.resume is None:
        newest, _ = latest_valid_checkpoint(out)
        if newest is not None:
            raise FidelError(out, f"already holds checkpoints (newest {newest.name}); pass --resume auto to "
                                  "continue, or choose a new --output-dir")
        return None
    if tc.resume == "auto":
        newest, rejected = latest_valid_checkpoint(out)
        for path, problem in rejected:
            warn(f"skipping {path.name}, newer than the checkpoint resumed: {problem}")
        return newest
    path = Path(tc.resume)
    if not path.is_file():
        raise FidelError(path, "--resume: checkpoint not found" if not path.exists() else "--resume: not a file")
    from trainer.experimental import community_resume, is_community_file  # it builds on this module

    if is_community_file(path):  # triaged, then imported once into the output dir (rank 0 only: from_rank0)
        return community_resume(tc, path, warn)
    verify_checkpoint(path)  # before any work, not after the model is built
    return path


def resume_on_every_rank(tc: TrainConfig, env: Dist, device: torch.device,
                         warn: Callable[[str], None]) -> Path | None:
    """Rank 0 decides fresh or resume (and from which checkpoint); every rank loads that file, so the output dir
    must be one folder that every machine sees."""
    resume_path = from_rank0(lambda: resolve_resume(tc, warn), env)
    if any_rank(resume_path is not None and not resume_path.is_file(), env, device):
        raise FidelError(resume_path, "rank 0 resumes from it but another rank cannot read it: --output-dir must be "
                                      "a folder every machine shares")
    return resume_path


def check_output_dir(out: Path) -> None:
    """The output dir is a folder we can write in, or one we can create: checked before any work."""
    if out.exists() and not out.is_dir():
        raise FidelError(out, "output dir is a file, not a folder")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise FidelError(out, f"output dir cannot be created: {existing} is a file")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # os.access says yes to root on a read-only mount
    except OSError as exc:
        raise FidelError(out, f"output dir is not writable ({exc.strerror})") from None


def check_base_tokenizer(tc: TrainConfig) -> None:
    """With the base tokenizer known, the extended one must keep its pieces at the same ids."""
    if tc.base_tokenizer is None:
        return
    line = check_base_pieces(load_model_proto(tc.tokenizer), load_model_proto(tc.base_tokenizer))
    if not line.passed:
        raise FidelError(tc.tokenizer, f"does not extend base tokenizer {tc.base_tokenizer}: {line.value} "
                                       f"({line.detail}); its base rows would be trained on the wrong pieces")


def checkpoint_bytes(model: UnifiedVoiceGPT) -> int:
    """About one checkpoint: the trainable tensors and AdamW's two moments of each, in float32, plus slack."""
    trainable = sum(t.numel() * 4 for t in trainable_state(model).values())
    return trainable * 3 + (1 << 20)


def check_free_space(out: Path, model: UnifiedVoiceGPT) -> None:
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    free, need = shutil.disk_usage(existing).free, checkpoint_bytes(model)
    if free < need:
        raise FidelError(out, f"{free / 2**20:.1f} MiB free, one checkpoint needs about {need / 2**20:.1f} MiB: "
                              "free some space or choose another output dir")


def check_rows(data, cfg: GPTConfig) -> None:
    """Every row training will read, checked as `fidel data check` checks it: a bad one is manifest:line."""
    if data.source == "jsonl":
        from trainer.datacheck import check_training_pairs

        check_training_pairs([*data.train_set.pairs, *data.val_set.pairs], cfg)
    else:
        from trainer.parquet_data import check_training_rows

        check_training_rows(data.train_set, cfg)
        check_training_rows(data.val_set, cfg)


def recorded_config(tc: TrainConfig) -> dict:
    """The config a checkpoint keeps, with absolute paths: an export from another folder finds the same files."""
    paths = {k: str(Path(v).absolute()) for k in ("tokenizer", "config", "base_checkpoint", "base_tokenizer")
             if (v := getattr(tc, k))}
    return {**tc.to_dict(), **paths}


def lineage_of(tc: TrainConfig, setup: Setup, env: Dist, total_steps: int) -> dict:
    return {
        "id": uuid.uuid4().hex,
        "base_checkpoint": tc.base_checkpoint,
        "base_rows": setup.base_rows,
        "text_rows": setup.cfg.text_rows,
        "base_rows_sha256": setup.base_hash,
        "tokenizer_sha256": file_sha256(tc.tokenizer),
        "config_sha256": file_sha256(tc.config),
        "freeze": tc.freeze,
        "duration_control": tc.duration_control,
        "init": setup.init.to_dict() if setup.init else None,
        "mlflow_run_id": tc.mlflow_run_id,
        "schedule_total_steps": total_steps,  # the LR schedule's length, fixed for the lineage
        "effective_batch": effective_batch(tc, env),
        "batch_changes": [],
    }


def effective_batch(tc: TrainConfig, env: Dist) -> dict:
    batch = {"batch_size": tc.batch_size, "grad_accumulation": tc.grad_accumulation, "world": env.world}
    # only when set, so that lineages from before the token budget compare equal
    return {**batch, "batch_tokens": tc.batch_tokens} if tc.batch_tokens else batch


def check_lineage(saved: dict, fresh: dict, path: Path) -> None:
    for key in ("base_rows_sha256", "tokenizer_sha256", "text_rows", "freeze"):
        if saved.get(key) != fresh.get(key):
            raise FidelError(path, f"{key} differs from this run's ({saved.get(key)} vs {fresh.get(key)}): "
                                   "not the same lineage")


def micro_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2**63)


class MetricWindow:
    """Token-weighted metrics over an interval, summed on the device (no host sync until read)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def add(self, sums) -> None:
        self.sums += torch.stack([sums.text_ce.detach(), sums.text_tokens, sums.mel_ce.detach(), sums.mel_tokens,
                                  sums.mel_correct]).to(torch.float64)

    def result(self, prefix: str, env: Dist) -> dict:
        text_ce, text_tokens, mel_ce, mel_tokens, mel_correct = all_reduce_sum(self.sums.clone(), env).tolist()
        return {
            f"{prefix}text_loss": text_ce / max(1.0, text_tokens),
            f"{prefix}mel_loss": mel_ce / max(1.0, mel_tokens),
            f"{prefix}mel_top1": mel_correct / max(1.0, mel_tokens),
        }


@torch.no_grad()
def evaluate(model: UnifiedVoiceGPT, dataset, batches: list[list[int]], device: torch.device,
             dtype: torch.dtype | None, env: Dist) -> dict:
    """Validation over all val batches, sharded across ranks and summed.

    With duration control the slot drops to speed_emb(0) as in training (so train and val losses compare, as in
    the community trainer), drawn from a seed per val batch: every validation, on any number of ranks, drops
    the same items, and training's RNG stream is left as it was."""
    was_training = model.training
    model.eval()
    model.drop_duration_in_eval = True
    window = MetricWindow(device)
    mine = list(range(len(batches)))[env.rank::env.world]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[batches[i] for i in mine], collate_fn=collate)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for index, batch in zip(mine, loader, strict=True):
                torch.manual_seed(index)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    window.add(model.loss_sums(batch.to(device)))
    finally:
        model.drop_duration_in_eval = False
        model.train(was_training)
    return window.result("val_", env)


class NonFiniteWatch:
    """Non-finite steps (loss or gradient norm), noticed on the device and read on the host only when the loop
    flushes metrics anyway, or at once where the optimizer cannot skip a step on the device (CPU, foreach).

    `found` stays set from the first bad step on: the fused AdamW reads it as GradScaler's found_inf and skips
    its update on the device, so no weight moves after that step until the loop notices and stops. Under fp16,
    GradScaler drives found_inf itself and skips the bad step alone (its gradients are NaN: nan_unless_finite).
    """

    def __init__(self, device: torch.device, env: Dist, on_device: bool):
        self.env = env
        self.on_device = on_device
        self.found = torch.zeros((), device=device)  # 0.0 or 1.0, found_inf's format
        self.first = torch.zeros(4, dtype=torch.float64, device=device)  # step, text loss, mel loss, grad norm

    def record(self, step: int, losses: torch.Tensor, grad_norm: torch.Tensor, check_grads: bool) -> None:
        """losses: this rank's share of the step's [text loss, mel loss]; summed over ranks, the step's."""
        losses = all_reduce_sum(losses.detach().float(), self.env)
        bad = ~torch.isfinite(losses).all()
        if check_grads:  # under fp16 GradScaler skips overflowed steps itself, and they are no failure
            bad = bad | ~torch.isfinite(grad_norm)
        step_value = torch.full((1,), step, dtype=torch.float64, device=losses.device)
        detail = torch.cat([step_value, losses.double(), grad_norm.reshape(1).double()])
        self.first = torch.where(bad & (self.found == 0), detail, self.first)
        self.found = torch.maximum(self.found, bad.float())

    @contextmanager
    def skipping(self, optimizer):
        """optimizer.step() updates nothing while found is set (optimizers with _step_supports_amp_scaling)."""
        optimizer.grad_scale, optimizer.found_inf = None, self.found
        try:
            yield
        finally:
            del optimizer.grad_scale, optimizer.found_inf

    def failure(self) -> str | None:
        """Why training must stop, or None. Reads the device."""
        found, step, text, mel, norm = torch.cat([self.found.reshape(1).double(), self.first]).tolist()
        if not found:
            return None
        if math.isfinite(text) and math.isfinite(mel):
            return f"non-finite gradient norm {norm:.4g} at step {int(step)} (text loss {text:.4g}, mel loss {mel:.4g})"
        return f"non-finite loss at step {int(step)} (text {text:.4g}, mel {mel:.4g})"


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer takes GradScaler's found_inf (fused AdamW): a bad step is skipped with no host sync."""
    return getattr(optimizer, "_step_supports_amp_scaling", False)


def fp16_scale(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """GradScaler's scale left on the device (get_scale() reads it back); it drops when a step is skipped."""
    return scaler._get_scale_async().clone() if scaler.is_enabled() else None


class LossModel(torch.nn.Module):
    """What DDP wraps: forward returns the loss sums, so gradient sync hooks see the whole graph."""

    def __init__(self, model: UnifiedVoiceGPT):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch):
        return self.model.loss_sums(batch)


@dataclass
class Position:
    """Where training is: optimizer steps done, and micro-batches of this epoch's plan consumed."""

    step: int = 0
    epoch: int = 0
    micro: int = 0


def rank_micro_batches(plan: list[list[int]], start: int, group: int, accum: int, env: Dist):
    """(global index, item ids) of this rank's micro-batches from `start` to the last whole step of the plan."""
    whole = len(plan) // group * group
    for first in range(start, whole, group):
        for a in range(accum):
            index = first + env.rank * accum + a
            yield index, plan[index]


def convert_position(micro: int, old_plan_len: int, new_plan_len: int, group: int) -> int:
    """Same share of the epoch under a new batch plan, rounded down to a whole step."""
    return int(micro / max(1, old_plan_len) * new_plan_len) // group * group


def micro_batch_loader(dataset, batches: list[list[int]], tc: TrainConfig, device: torch.device):
    """Collated batches in plan order; pinned on CUDA (Batch.pin_memory), so .to(non_blocking=True) is async."""
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=tc.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator()))  # its own generator: making a loader must not draw from the global RNG


def train(tc: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    hooks = hooks or TrainHooks()
    env = init_from_env("cuda" if tc.device != "cpu" and torch.cuda.is_available() else "cpu")
    if not env.main:
        hooks = TrainHooks(on_warning=hooks.on_warning)
    device = resolve_device(tc.device, env)
    dtype = amp_dtype(tc.amp, device)
    out = Path(tc.output_dir)
    check_output_dir(out)
    resume_path = resume_on_every_rank(tc, env, device, hooks.on_warning)
    check_base_tokenizer(tc)
    cfg = load_gpt_config(tc.config).with_text_tokens(load_tokenizer(tc.tokenizer).get_piece_size())
    # the Parquet dataset of `fidel data build` (its tokenizer must be this run's) or paired JSONL manifests
    data = training_data(tc.train_manifests, tc.val_manifests, tc.batch_size, tc.seed, tokenizer=tc.tokenizer,
                         max_tokens=tc.batch_tokens)
    check_rows(data, cfg)
    setup = build_model(tc)
    check_free_space(out, setup.model)
    if env.main:
        hooks.on_claim(out)
        remove_stale_temp_files(out)
    model = setup.model.to(device)
    if model_base_rows_hash(model) != setup.base_hash:
        raise FidelError(tc.base_checkpoint, "base rows changed while building the model")
    if tc.compile:
        model.compile_blocks()

    accum = tc.grad_accumulation
    group = env.world * accum
    steps_per_epoch = max(1, len(data.sampler.epoch_batches(0)) // group)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    val_every = tc.val_interval or steps_per_epoch

    lineage = lineage_of(tc, setup, env, total_steps)
    saved_state = None
    if resume_path is not None:
        saved_state, _ = load_checkpoint(resume_path)
        check_lineage(saved_state["lineage"], lineage, resume_path)
        lineage = {**lineage, **saved_state["lineage"]}
        lineage["mlflow_run_id"] = lineage.get("mlflow_run_id") or tc.mlflow_run_id

    schedule_total = lineage["schedule_total_steps"]
    optimizer = make_optimizer(param_groups(model, tc.learning_rate, tc.new_rows_lr, tc.weight_decay), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, schedule_total, tc.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    wrapped = LossModel(model)
    if env.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)

    pos, val_history, best, skipped = Position(), [], None, 0
    resumed_from, replay = None, []
    if saved_state is not None:
        frozen = {k: v for k, v in model.state_dict().items() if k in FROZEN_BUFFERS}
        model.load_state_dict({**saved_state["model"], **frozen})
        optimizer.load_state_dict(saved_state["optimizer"])
        scheduler.load_state_dict(saved_state["scheduler"])
        if saved_state["scaler"]:
            scaler.load_state_dict(saved_state["scaler"])
        pos = Position(saved_state["step"], saved_state["epoch"], saved_state["position"])
        val_history, best = list(saved_state["val_history"]), saved_state.get("best")
        skipped = saved_state.get("skipped_steps", 0)
        set_rng_state(saved_state["rng"])
        resumed_from = pos.step
        replay = saved_state.get("committed_rows", [])
        if lineage["effective_batch"] != effective_batch(tc, env):
            pos.micro = apply_batch_change(lineage, tc, env, pos, saved_state, data, hooks)
        del saved_state
    hooks.on_start({"lineage": lineage, "resumed_from": resumed_from, "total_steps": total_steps,
                    "device": str(device), "amp": str(dtype) if dtype else "fp32", "world": env.world,
                    "trainable_params": sum(p.numel() for p in model.parameters()), "data": data.info})
    if replay:
        hooks.on_commit(replay)  # the layer above drops what it already logged
    pending: list[tuple[int, dict]] = []
    last_saved: Path | None = resume_path
    gate_failure: str | None = None
    last_save_time = time.monotonic()
    writer = AsyncCheckpointWriter(background=tc.async_save)

    def save(reason: str) -> None:
        nonlocal last_saved, last_save_time
        last_save_time = time.monotonic()
        if not env.main:
            return
        base_intact = model_base_rows_hash(model) == lineage["base_rows_sha256"]
        if not base_intact and tc.freeze == "split":
            raise FidelError(tc.base_checkpoint, "base rows differ from the base checkpoint at save: refusing to save")
        state = {
            "model": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "step": pos.step, "epoch": pos.epoch, "position": pos.micro, "accumulation_counter": 0,
            "rng": rng_state(), "lineage": lineage, "val_history": val_history, "best": best,
            "skipped_steps": int(skipped), "train_config": recorded_config(tc),
            "committed_rows": list(pending),  # replayed on resume in case a kill fell between save and commit
        }
        sidecar = {"epoch": pos.epoch, "sampler": {"epoch": pos.epoch, "position": pos.micro, "seed": tc.seed},
                   "lineage_id": lineage["id"], "base_rows_sha256": lineage["base_rows_sha256"],
                   "tokenizer_sha256": lineage["tokenizer_sha256"], "config_sha256": lineage["config_sha256"],
                   "freeze": lineage["freeze"], "init": lineage["init"], "reason": reason,
                   "base_rows_intact": base_intact, "mlflow_run_id": lineage["mlflow_run_id"],
                   "total_steps": total_steps, "schedule_total_steps": schedule_total,
                   "metrics": val_history[-1] if val_history else {},
                   "imported": lineage.get("imported")}  # a community checkpoint the lineage started from
        keep = {Path(best["path"])} if best and tc.keep_best else set()
        rows = list(pending)
        pending.clear()

        def durable(saved) -> None:  # runs on this thread once the write is on disk: metrics commit with it
            nonlocal last_saved
            prune_checkpoints(out, tc.keep_last, keep)
            hooks.on_commit(rows)
            hooks.on_checkpoint(saved.path, saved.sidecar)
            last_saved = saved.path

        writer.submit(out, pos.step, state, sidecar, on_done=durable)

    def validate() -> bool:
        """Returns True when this is the best validation so far (worth keeping a checkpoint of)."""
        nonlocal best
        nonlocal gate_failure
        metrics = evaluate(model, data.val_set, data.val_batches, device, dtype, env)
        val_history.append({"step": pos.step, **metrics})
        pending.append((pos.step, metrics))
        gate_failure = hooks.on_validation(pos.step, metrics, val_history, model) if env.main else None
        loss = tc.text_loss_weight * metrics["val_text_loss"] + tc.mel_loss_weight * metrics["val_mel_loss"]
        if best is None or loss < best["loss"]:
            best = {"step": pos.step, "loss": loss, "path": str(out / f"ckpt-step{pos.step:08d}.pt")}
            return True
        return False

    model.train()
    window, last_train = MetricWindow(device), {}
    watch = NonFiniteWatch(device, env, on_device=skips_on_device(optimizer))
    skipped = torch.tensor(skipped, device=device)  # counted on the device: no host sync per step
    status, reason = "completed", ""
    if pos.step == 0 and not val_history:
        validate()  # the start point "validation improves" compares against
        if any_rank(gate_failure is not None, env, device):  # a gate failed before any step: stop at once
            status, reason = "failed", gate_failure or "a gate failed on another rank"
    started = time.monotonic()
    steps_at_start = pos.step
    with StopRequest() as stop, writer_drained(writer):
        while pos.step < total_steps and status == "completed":
            plan = data.sampler.epoch_batches(pos.epoch)
            mine = list(rank_micro_batches(plan, pos.micro, group, accum, env))
            loader = micro_batch_loader(data.train_set, [ids for _, ids in mine], tc, device)
            for first in range(0, len(mine), accum):
                micro = [(mine[first + a][0], next(loader)) for a in range(accum)]
                losses = accumulate(wrapped, micro, tc, pos.epoch, device, dtype, scaler, window, env)
                scale_before = fp16_scale(scaler)
                grad_norm = optimizer_step(model, optimizer, scheduler, scaler, tc, watch, losses, pos.step + 1)
                if scale_before is not None:
                    skipped += fp16_scale(scaler) < scale_before
                pos.step += 1
                pos.micro += group
                writer.poll()
                log_due = pos.step % tc.log_interval == 0 or pos.step == total_steps
                val_due = pos.step % val_every == 0 or pos.step == total_steps
                # the device path reads the watch only where the loop syncs anyway: no host sync in between
                if (not watch.on_device or log_due or val_due) and (failure := watch.failure()):
                    status, reason = "failed", failure
                    break
                if log_due:
                    last_train = {**window.result("train_", env), "lr": scheduler.get_last_lr()[1],
                                  "grad_norm": float(grad_norm), "epoch": pos.epoch + pos.micro / max(1, len(plan)),
                                  "skipped_steps": int(skipped),
                                  "steps_per_s": (pos.step - steps_at_start) / max(1e-9, time.monotonic() - started)}
                    pending.append((pos.step, last_train))
                    window = MetricWindow(device)
                    hooks.on_progress(pos.step, total_steps, last_train)
                is_best = val_due and validate()
                gate_stop = val_due and any_rank(gate_failure is not None, env, device)
                overdue = bool(tc.save_minutes) and time.monotonic() - last_save_time >= tc.save_minutes * 60
                requested, overdue = any_ranks([stop.requested, overdue], env, device)
                stopping = requested or gate_stop
                if (pos.step % tc.save_interval == 0 or pos.step == total_steps or stopping or overdue
                        or (is_best and tc.keep_best)):
                    if failure := watch.failure():  # never save the state after a non-finite step
                        status, reason = "failed", failure
                        break
                    save("gate" if gate_stop else "signal" if stopping else "interval")
                if gate_stop:
                    status, reason = "failed", gate_failure or "a gate failed on another rank"
                    break
                if stopping:
                    by = f"signal {stop.signal}" if stop.requested else "a signal to another rank"
                    status, reason = "preempted", f"stopped by {by}; saved at step {pos.step}"
                    break
                if pos.step >= total_steps:
                    break
            else:
                pos.epoch, pos.micro = pos.epoch + 1, 0
    if status == "failed" and pending:
        hooks.on_commit(list(pending))  # keep the evidence of the failure; no checkpoint of a broken state
    return TrainResult(status, pos.step, total_steps, last_saved, lineage, val_history, last_train, reason,
                       resumed_from, time.monotonic() - started, int(skipped))


@contextmanager
def writer_drained(writer: AsyncCheckpointWriter):
    """Leave the loop (normally, on a stop or on an error) only once the checkpoint in flight is durable."""
    try:
        yield writer
    finally:
        writer.wait()


def global_token_counts(micro: list[tuple[int, Batch]], device: torch.device, env: Dist):
    """Scored text and mel targets of the whole step (every micro-batch on every rank), from host lengths: one
    process keeps them on the host; DDP sums them on the device and leaves them there (no read back)."""
    scored = [b.scored_counts() for _, b in micro]
    counts = torch.tensor([float(sum(text for text, _ in scored)), float(sum(mel for _, mel in scored))],
                          dtype=torch.float64)
    if not env.enabled:
        return counts.tolist()
    return all_reduce_sum(counts.to(device), env).float().unbind()


def nan_unless_finite(loss: torch.Tensor) -> torch.Tensor:
    """loss × 1, or × NaN when it is not finite: an infinite loss can have finite gradients, and this way every
    non-finite loss shows in the gradients, where GradScaler's fp16 check finds it on the device."""
    return loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))


def accumulate(wrapped, micro: list[tuple[int, Batch]], tc: TrainConfig, epoch: int, device, dtype, scaler,
               window: MetricWindow, env: Dist) -> torch.Tensor:
    """Forward and backward over one step's micro-batches on this rank, loss normalised over the global step.

    Returns this rank's share of the step's [text loss, mel loss] on the device (summed over ranks: the step's).
    """
    text_tokens, mel_tokens = global_token_counts(micro, device, env)
    losses = torch.zeros(2, device=device)
    for i, (index, batch) in enumerate(micro):
        torch.manual_seed(micro_seed(tc.seed, epoch, index))
        last = i == len(micro) - 1
        with wrapped.no_sync() if env.enabled and not last else nullcontext():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                sums = wrapped(batch.to(device, non_blocking=True))
            # DDP averages gradients over ranks; × world turns that average back into the global sum
            loss = (tc.text_loss_weight * sums.text_ce / text_tokens
                    + tc.mel_loss_weight * sums.mel_ce / mel_tokens) * env.world
            scaler.scale(nan_unless_finite(loss)).backward()
        losses += torch.stack([sums.text_ce.detach() / text_tokens, sums.mel_ce.detach() / mel_tokens])
        window.add(sums)
    return losses


def optimizer_step(model, optimizer, scheduler, scaler, tc: TrainConfig, watch: NonFiniteWatch | None = None,
                   losses: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
    """Unscale, clip, update, advance the schedule. With a watch, a step whose loss or gradient norm is not
    finite updates no weight: the fused optimizer skips it on the device, any other is not stepped at all."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    skip = nullcontext()
    if watch is not None:
        watch.record(step, losses, grad_norm, check_grads=not scaler.is_enabled())
        if not watch.on_device and watch.failure():
            optimizer.zero_grad(set_to_none=True)
            return grad_norm
        if watch.on_device and not scaler.is_enabled():  # with fp16, GradScaler.step sets found_inf itself
            skip = watch.skipping(optimizer)
    with skip:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm


def apply_batch_change(lineage: dict, tc: TrainConfig, env: Dist, pos: Position, saved_state: dict, data,
                       hooks: TrainHooks) -> int:
    """A resume with another effective batch (another GPU, say): allowed, warned, and written into the lineage."""
    old, new = lineage["effective_batch"], effective_batch(tc, env)
    old_tc = saved_state["train_config"]
    from trainer.data import BucketBatchSampler

    old_plan_len = len(BucketBatchSampler(*data.train_set.lengths(), old["batch_size"], seed=old_tc["seed"],
                                          max_tokens=old_tc.get("batch_tokens")).epoch_batches(pos.epoch))
    new_plan_len = len(data.sampler.epoch_batches(pos.epoch))
    micro = convert_position(pos.micro, old_plan_len, new_plan_len, new["world"] * new["grad_accumulation"])
    rule = ("LR schedule kept in optimizer steps (schedule_total_steps unchanged); learning rate unchanged; "
            f"position in epoch {pos.epoch} converted by share: micro-batch {pos.micro}/{old_plan_len} → "
            f"{micro}/{new_plan_len}")
    lineage["batch_changes"] = [*lineage.get("batch_changes", []),
                                {"step": pos.step, "from": old, "to": new, "rule": rule}]
    lineage["effective_batch"] = new
    hooks.on_warning(f"effective batch changed at step {pos.step}: {old} → {new}; {rule}")
    return micro
