"""Training and validation metrics: token-weighted losses summed on the device, the step's token counts, and the
watch that notices a non-finite step without a host sync per step."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from fidel_tts.trainer.data.manifest import collate
from fidel_tts.trainer.model.gpt import Batch, UnifiedVoiceGPT
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.training.distributed import all_reduce_sum


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


def global_token_counts(micro: list[tuple[int, Batch]], device: torch.device, env: Dist):
    """Scored text and mel targets of the whole step (every micro-batch on every rank), from host lengths: one
    process keeps them on the host; DDP sums them on the device and leaves them there (no read back)."""
    scored = [b.scored_counts() for _, b in micro]
    counts = torch.tensor([float(sum(text for text, _ in scored)), float(sum(mel for _, mel in scored))],
                          dtype=torch.float64)
    if not env.enabled:
        return counts.tolist()
    return all_reduce_sum(counts.to(device), env).float().unbind()


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
