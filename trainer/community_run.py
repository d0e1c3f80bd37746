"""Community-trainer checkpoints made the way RobelAdugna/Indextts_Am-V2 `trainers/train_gpt_v2.py` makes them,
on a small model, for triage's tests and docs (reference/amv2_checkpoint_format.md §2).

Reproduced from the trainer's source:
- one `AdamW(model.parameters(), lr, weight_decay)` over every parameter (defaults lr 2e-5, wd 0.01: decoupled
  decay on every parameter that has a gradient, base text rows included), ids in upstream's parameter order;
- `get_cosine_schedule_with_warmup` (transformers' own function), stepped after every optimizer step, also
  when the GradScaler skipped it;
- the step: loss = 0.2·text + 0.8·mel, backward (scaled when fp16), unscale, `clip_grad_norm_(1.0)`,
  `scaler.step` + `scaler.update` or `optimizer.step`, `scheduler.step`, `zero_grad(set_to_none=True)`;
- version "head" (be9542f and back to 729908f): gradient hooks zero rows 0..B-1 of the grads of
  text_embedding.weight, text_head.weight and text_head.bias, registered after the resume (a broken run resumed
  with "head" gets them from then on); version "cf31c91" (before 729908f): no hooks, every text row trains;
- `model_step{N}.pth` every save_interval steps ({model, optimizer, scheduler, scaler, epoch (next), step,
  batch_idx (next), recent_checkpoints, accumulation_counter, extra, last_losses}), and `latest.pth` beside it:
  head: + manifests, rng_state (torch, numpy's MT19937 tuple with its ndarray, python), batch_size,
  grad_accumulation, `pytorch_version` = torch.__version__ (a TorchVersion), cuda_version, cuda_peak_memory;
  cf31c91: {model, optimizer, scheduler, scaler, epoch, step, batch_idx, recent_checkpoints, manifests};
  rotation keeps the model_step files listed in recent_checkpoints (the last keep_checkpoints);
- `prune_export`: tools/prune_gpt_checkpoint.py (the model's tensors as an OrderedDict, dtype keep/fp16/fp32).

Not reproduced (said here so no test leans on it):
- the model is fidel's UnifiedVoiceGPT at tiny size, not upstream's UnifiedVoice; its state_dict has upstream's
  names and order, so optimizer ids map the same way (first param of the text tensors included);
- fp16 autocast does not run on CPU: with amp="float16" the maths stays fp32 and the GradScaler starts at 2^127, so
  its first steps overflow and are skipped (no AdamW step, no decay, scheduler still steps), as fp16 runs' first
  steps are; the scaler's state_dict is the real one;
- only the first `real_steps` steps run a batch. The steps after them ("fast-forward", so that 25k or 52k steps
  take a second) have no batch, and change only the three text tensors: rows whose Adam moments are zero get
  exactly AdamW's decoupled decay `p.mul_(1 - lr * wd)` (all AdamW does to a row with zero gradient and zero
  moments: its Adam term is 0/(0+eps)); base rows with moments under the hooks (a broken run resumed with "head")
  get AdamW's own update with a zero gradient (torch.optim.adam.adam on those rows); every other row (new rows,
  base rows of a run without hooks) gets the decay only, its moments left as they were. The rest of the model
  keeps its last real values; Adam step counters advance by the steps taken;
- no validation, TensorBoard, DataLoader workers, gradient accumulation (1), or CUDA RNG state (None); the epoch
  stays at the one the run started in;
- the other community trainers are not generated: JarodMica's PR #545 and instavar build an AdamW over
  `model.parameters()` too and write the same optimizer layout with other top-level keys; Ksuriuri's single-GPU run has no text_head state (mel loss only) and its multi-GPU run a
  filtered optimizer whose ids triage cannot map to names (reference/amv2_checkpoint_format.md §3–6).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.adam import adam

from trainer.config import load_gpt_config
from trainer.data import collate, training_data
from trainer.model import UnifiedVoiceGPT, load_upstream_state_dict, upstream_state_dict
from trainer.tokenizer import load_tokenizer
from trainer.vocab import extended_model
from trainer.weights import load_base_checkpoint, torch_load

VERSIONS = ("head", "cf31c91")  # with the gradient hooks / before them
OVERFLOW_SCALE = 2.0 ** 127  # fp32 stand-in for fp16's early overflows (see the docstring)


@dataclass(frozen=True)
class Project:
    base_checkpoint: Path
    config: Path
    tokenizer: Path
    train_manifest: Path


@dataclass(frozen=True)
class TrainerFlags:
    """The train_gpt_v2.py flags that shape a checkpoint, at the trainer's defaults."""

    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    total_steps: int | None = None  # --max-steps, else epochs × batches; None: the run's own length
    grad_clip: float = 1.0
    text_loss_weight: float = 0.2
    mel_loss_weight: float = 0.8
    amp: str = "float32"  # "float16": GradScaler; "bfloat16" and "float32": no scaler
    batch_size: int = 8
    save_interval: int = 1000
    keep_checkpoints: int = 3
    seed: int = 1234


def community_model(project: Project, hooks: bool, seed: int = 0) -> UnifiedVoiceGPT:
    """One [N+1, D] text parameter, new rows random, base-row gradients zeroed when hooks."""
    cfg = load_gpt_config(project.config).with_text_tokens(load_tokenizer(project.tokenizer).get_piece_size())
    base = load_base_checkpoint(project.base_checkpoint, load_gpt_config(project.config))
    hooked, _ = extended_model(base, cfg, base.base_rows, "random", seed, None, "hooks")
    if hooks:
        return hooked
    model = UnifiedVoiceGPT(cfg, base_rows=0, freeze="hooks")  # base_rows=0: the hook zeroes no row
    load_upstream_state_dict(model, upstream_state_dict(hooked))
    return model


def with_hooks(model: UnifiedVoiceGPT, base_rows: int) -> UnifiedVoiceGPT:
    """The same weights with the gradient hooks registered (head's apply_extended_vocab_fix after a resume)."""
    hooked = UnifiedVoiceGPT(model.cfg, base_rows=base_rows, freeze="hooks")
    load_upstream_state_dict(hooked, upstream_state_dict(model))
    return hooked


def text_params(model: UnifiedVoiceGPT) -> list[torch.nn.Parameter]:
    return [model.text_embedding.weight, model.text_head.weight, model.text_head.bias]


def fast_forward(optimizer, scheduler, model: UnifiedVoiceGPT, base_rows: int, hooks: bool, steps: int) -> None:
    """`steps` steps without a batch (see the module docstring): AdamW's arithmetic on the text tensors."""
    group = optimizer.param_groups[0]
    wd, (beta1, beta2), eps = group["weight_decay"], group["betas"], group["eps"]
    decayed, exact = [], []  # exact: base rows with moments under the hooks get AdamW's update, zero gradient
    for p in text_params(model):
        state = optimizer.state.get(p)
        if state and hooks and bool(state["exp_avg_sq"][:base_rows].any()):
            decayed.append(p[base_rows:])
            exact.append((p[:base_rows], state, state["step"].clone()))
        elif state:
            decayed.append(p)
    with torch.no_grad():
        for _ in range(steps):
            lr = group["lr"]
            for rows in decayed:
                rows.mul_(1 - lr * wd)
            for rows, state, step in exact:
                adam([rows], [torch.zeros_like(rows)], [state["exp_avg"][:base_rows]],
                     [state["exp_avg_sq"][:base_rows]], [], [step], foreach=False,
                     decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                     weight_decay=wd, eps=eps, maximize=False)
            scheduler.step()
    for state in optimizer.state.values():
        state["step"] += steps


def real_step(model, optimizer, scheduler, scaler, batch, flags: TrainerFlags) -> dict:
    text, mel = model.loss_sums(batch).losses()
    loss = flags.text_loss_weight * text + flags.mel_loss_weight * mel
    (scaler.scale(loss) if scaler else loss).backward()
    if flags.grad_clip > 0:
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), flags.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"text_loss": text.item(), "mel_loss": mel.item(), "mel_top1": 0.0}


def amv2_rng_state() -> dict:
    return {"torch_cpu": torch.get_rng_state(), "torch_cuda": None, "numpy": np.random.get_state(),
            "python": random.getstate()}


def save_files(out: Path, version: str, state: dict, flags: TrainerFlags, recent: list[str]) -> Path:
    """model_step{N}.pth and latest.pth as the trainer writes them; older model_step files rotated away."""
    step = state["step"]
    path = out / f"model_step{step}.pth"
    recent.append(str(path))
    recent[:] = recent[-flags.keep_checkpoints:]
    common = {k: state[k] for k in ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "batch_idx")}
    torch.save({**common, "recent_checkpoints": list(recent), "accumulation_counter": 0,
                "extra": {"type": "step", "manifests": state["manifests"], "tokenizer": state["tokenizer"],
                          "amp_dtype": flags.amp},
                "last_losses": state["last_losses"]}, path)
    latest = {**common, "recent_checkpoints": list(recent), "manifests": state["manifests"]}
    if version == "head":
        latest.update(rng_state=amv2_rng_state(), batch_size=flags.batch_size, grad_accumulation=1,
                      pytorch_version=torch.__version__, cuda_version=None, cuda_peak_memory=0)
    tmp = out / "latest.pth.tmp"
    torch.save(latest, tmp)
    tmp.replace(out / "latest.pth")
    for old in out.glob("model_step*.pth"):
        if str(old) not in recent:
            old.unlink()
    return path


def community_run(project: Project, out_dir: str | Path, steps: int, flags: TrainerFlags = TrainerFlags(),
                  version: str = "head", real_steps: int = 3, resume: str | Path | None = None) -> list[Path]:
    """Train to `steps` (the first `real_steps` after the start with batches, the rest fast-forwarded) and save
    every flags.save_interval steps and at the end. resume: a latest.pth / model_step file to continue from, as
    the trainer does when the vocabulary matches (weights, optimizer, scheduler, scaler, step, epoch, batch).
    Returns the model_step files still on disk, oldest first."""
    if version not in VERSIONS:
        raise ValueError(f"version {version!r}: choose from {VERSIONS}")
    torch.manual_seed(flags.seed)
    random.seed(flags.seed)
    np.random.seed(flags.seed)
    hooks = version == "head"
    model = community_model(project, hooks=False, seed=flags.seed)
    base_rows = load_base_checkpoint(project.base_checkpoint, load_gpt_config(project.config)).base_rows
    saved = torch_load(resume) if resume else None
    if saved:
        load_upstream_state_dict(model, saved["model"])
    if hooks:
        model = with_hooks(model, base_rows)  # registered after the resume, as head does
    model.train()
    from transformers.optimization import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=flags.learning_rate, weight_decay=flags.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, flags.warmup_steps, flags.total_steps or steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=OVERFLOW_SCALE) if flags.amp == "float16" else None
    step, epoch, recent = 0, 0, []
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        step, epoch, recent = saved["step"], saved["epoch"], list(saved.get("recent_checkpoints") or [])
    data = training_data([project.train_manifest], [project.train_manifest], flags.batch_size, flags.seed)
    batches = data.sampler.epoch_batches(epoch)
    manifest = {"path": str(project.train_manifest), "count": len(data.train_set), "languages": ["am"]}
    state = {"manifests": {"train": [manifest], "val": [manifest]}, "tokenizer": str(project.tokenizer),
             "last_losses": {}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first, batch_idx = step, 0
    while step < steps:
        if step - first < real_steps:
            ids = batches[batch_idx % len(batches)]
            state["last_losses"] = real_step(model, optimizer, scheduler, scaler,
                                             collate([data.train_set[i] for i in ids]), flags)
            taken = 1
        else:
            taken = min(steps, (step // flags.save_interval + 1) * flags.save_interval) - step
            fast_forward(optimizer, scheduler, model, base_rows, hooks, taken)
        step += taken
        batch_idx = (batch_idx + taken) % len(batches)
        if step % flags.save_interval == 0 or step == steps:
            state.update(model=upstream_state_dict(model), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                         epoch=epoch, step=step, batch_idx=batch_idx)
            save_files(out, version, state, flags, recent)
    return sorted(out.glob("model_step*.pth"), key=lambda p: int(p.stem.removeprefix("model_step")))


def prune_export(checkpoint: str | Path, output: str | Path, dtype: str = "keep") -> Path:
    """tools/prune_gpt_checkpoint.py: the `model` tensors alone, as an OrderedDict, optionally cast."""
    target = {"keep": None, "float16": torch.float16, "float32": torch.float32}[dtype]
    state = torch_load(checkpoint)
    state = state["model"] if isinstance(state, dict) and "model" in state else state
    pruned = OrderedDict((k, v.detach().cpu() if target is None or v.dtype == target else v.detach().cpu().to(target))
                         for k, v in state.items())
    torch.save(pruned, output)
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m trainer.community_run", description=__doc__.splitlines()[0])
    p.add_argument("--base-checkpoint", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--train-manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--version", choices=VERSIONS, default="head", help="head: with the gradient hooks; "
                                                                        "cf31c91: before them (the broken run)")
    p.add_argument("--real-steps", type=int, default=3, help="steps run with a batch; the rest fast-forwarded")
    p.add_argument("--resume", default=None)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=None, help="the schedule's length (default: --steps)")
    p.add_argument("--amp", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--save-interval", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    flags = TrainerFlags(learning_rate=a.learning_rate, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
                         total_steps=a.max_steps, amp=a.amp, batch_size=a.batch_size, save_interval=a.save_interval)
    project = Project(Path(a.base_checkpoint), Path(a.config), Path(a.tokenizer), Path(a.train_manifest))
    for path in community_run(project, a.out, a.steps, flags, a.version, a.real_steps, a.resume):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
