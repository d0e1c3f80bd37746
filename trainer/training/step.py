"""One optimizer step: forward and backward over the step's micro-batches (the loss normalised by the tokens of
the whole step, on every rank), then unscale, clip, update and advance the schedule.

One optimizer step consumes `world × grad_accumulation` micro-batches of the epoch's shuffled plan. The loss
is normalised by the tokens of all of them (counted on every rank, summed across ranks), so a step is the
same whether its micro-batches run in sequence, in parallel, or both. Dropout is seeded per micro-batch from
(seed, epoch, micro-batch index), so it too does not depend on how the step is split, nor on a resume.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from fidel_tts.trainer.data.manifest import collate
from fidel_tts.trainer.model.gpt import Batch, UnifiedVoiceGPT
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.training.metrics import MetricWindow, NonFiniteWatch, global_token_counts
from fidel_tts.trainer.training.options import TrainConfig


class LossModel(torch.nn.Module):
    """What DDP wraps: forward returns the loss sums, so gradient sync hooks see the whole graph."""

    def __init__(self, model: UnifiedVoiceGPT):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch):
        return self.model.loss_sums(batch)


def micro_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2**63)


def rank_micro_batches(plan: list[list[int]], start: int, group: int, accum: int, env: Dist):
    """(global index, item ids) of this rank's micro-batches from `start` to the last whole step of the plan."""
    whole = len(plan) // group * group
    for first in range(start, whole, group):
        for a in range(accum):
            index = first + env.rank * accum + a
            yield index, plan[index]


def micro_batch_loader(dataset, batches: list[list[int]], tc: TrainConfig, device: torch.device):
    """Collated batches in plan order; pinned on CUDA (Batch.pin_memory), so .to(non_blocking=True) is async."""
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=tc.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator()))  # its own generator: making a loader must not draw from the global RNG


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


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer takes GradScaler's found_inf (fused AdamW): a bad step is skipped with no host sync."""
    return getattr(optimizer, "_step_supports_amp_scaling", False)


def fp16_scale(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """GradScaler's scale left on the device (get_scale() reads it back); it drops when a step is skipped."""
    return scaler._get_scale_async().clone() if scaler.is_enabled() else None


@dataclass
class Position:
    """Where training is: optimizer steps done, and micro-batches of this epoch's plan consumed."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
