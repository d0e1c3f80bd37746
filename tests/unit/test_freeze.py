"""Freezing: split mode keeps base rows bit-identical through AdamW weight decay, fp16 GradScaler overflow and
clipping; the community trainers' gradient hooks (`--freeze hooks`) do not, and this records by how much."""

import json
from pathlib import Path

import pytest
import torch
from fidel_tts.trainer.model.config import GPTConfig
from fidel_tts.trainer.model.gpt import Batch, UnifiedVoiceGPT, upstream_state_dict
from fidel_tts.trainer.model.vocab import extended_model
from fidel_tts.trainer.model.weights import BaseCheckpoint, same_bytes
from fidel_tts.trainer.training.optim import make_optimizer, param_groups
from fidel_tts.trainer.training.options import TrainConfig
from fidel_tts.trainer.training.step import optimizer_step

BASE = GPTConfig(model_dim=32, layers=2, heads=2, max_text_tokens=40, max_mel_tokens=80, number_text_tokens=50,
                 number_mel_codes=34, start_mel_token=32, stop_mel_token=33)
EXTENDED = BASE.with_text_tokens(80)
B = 50
STEPS, WEIGHT_DECAY, OVERFLOW_EVERY = 200, 0.1, 25


def tiny_base() -> BaseCheckpoint:
    torch.manual_seed(0)
    state = upstream_state_dict(UnifiedVoiceGPT(BASE, base_rows=0))
    return BaseCheckpoint(Path("tiny-base"), state, {}, list(state))


def batch_for(step: int) -> Batch:
    """Text mixes base ids and new ids, so base rows do receive gradient before any freezing acts."""
    g = torch.Generator().manual_seed(step)
    return Batch(torch.randint(2, 81, (4, 10), generator=g), torch.tensor([10, 7, 9, 5]),
                 torch.randint(0, 32, (4, 24), generator=g), torch.tensor([24, 20, 13, 17]),
                 torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, generator=g))


@pytest.fixture(autouse=True)
def one_thread():
    """A 32-wide model: a second intra-op thread only waits on the first (and on a busy machine, much longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(freeze: str) -> dict:
    """200 AdamW steps (weight decay 0.1) under an fp16 GradScaler with forced overflows and clipping."""
    model, _ = extended_model(tiny_base(), EXTENDED, B, "mean", seed=0, freeze=freeze)
    before = [t.clone() for t in model.base_row_tensors()]
    new_before = upstream_state_dict(model)["text_embedding.weight"][B:].clone()
    tc = TrainConfig([], [], "", "", "", learning_rate=1e-3, new_rows_lr=1e-2, weight_decay=WEIGHT_DECAY,
                     grad_clip=1.0)
    groups = param_groups(model, tc.learning_rate, tc.new_rows_lr, tc.weight_decay)
    optimizer = make_optimizer(groups, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    skipped, decay = 0, 1.0
    model.train()
    torch.manual_seed(1)
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.float16):
            text_loss, mel_loss = model.loss_sums(batch_for(step)).losses()
        scaler.scale(tc.text_loss_weight * text_loss + tc.mel_loss_weight * mel_loss).backward()
        if step % OVERFLOW_EVERY == OVERFLOW_EVERY - 1:
            model.mel_head.weight.grad[0, 0] = float("inf")  # what an fp16 overflow leaves in a gradient
        scale = scaler.get_scale()
        lr = optimizer.param_groups[0]["lr"]
        optimizer_step(model, optimizer, scheduler, scaler, tc)
        if scaler.get_scale() < scale:
            skipped += 1
        else:
            decay *= 1 - lr * optimizer.param_groups[0]["weight_decay"]
    after = model.base_row_tensors()
    return {"model": model, "optimizer": optimizer, "before": before, "after": after, "skipped": skipped,
            "decay": decay, "new_moved": (upstream_state_dict(model)["text_embedding.weight"][B:] - new_before)}


def drift(before: list[torch.Tensor], after: tuple[torch.Tensor, ...]) -> dict:
    names = ("text_embedding.weight", "text_head.weight", "text_head.bias")
    out = {}
    for name, a, b in zip(names, before, after, strict=True):
        delta = (b - a).abs().reshape(len(a), -1)
        out[name] = {"max_abs_delta": float(delta.max()), "rows_changed": int((delta > 0).any(1).sum()),
                     "rows": len(a)}
    return out


@pytest.mark.slow
def test_split_keeps_base_rows_bit_identical_and_never_shows_them_to_the_optimizer():
    result = run("split")
    assert result["skipped"] == STEPS // OVERFLOW_EVERY  # the forced overflows really skipped their steps
    for a, b in zip(result["before"], result["after"], strict=True):
        assert same_bytes(a, b)
    optimized = {id(p) for group in result["optimizer"].param_groups for p in group["params"]}
    model = result["model"]
    assert not any(id(t) in optimized for t in model.base_row_tensors())
    groups = {g["name"]: g for g in result["optimizer"].param_groups}
    assert groups["new_rows"]["weight_decay"] == 0.0 and groups["new_rows"]["lr"] == 1e-2
    assert {id(p) for p in groups["new_rows"]["params"]} == {
        id(model.text_embedding.new), id(model.text_head.new_weight), id(model.text_head.new_bias)}
    assert result["new_moved"].abs().amax(1).gt(0).all()  # every new row learned something


@pytest.mark.slow
def test_hooks_mode_drifts_and_the_drift_is_weight_decay(record_property, tmp_path):
    """The community trainers' hooks zero base-row gradients, yet AdamW's decoupled weight decay still shrinks
    every base row on every step that runs. The numbers go on record (printed, and as a junit property)."""
    result = run("hooks")
    model, optimizer = result["model"], result["optimizer"]
    state = optimizer.state[model.text_embedding.weight]
    assert state["exp_avg"][:B].abs().max() == 0 and state["exp_avg_sq"][:B].abs().max() == 0  # hooks did zero
    report = drift(result["before"], result["after"])
    report["steps"], report["skipped_overflow_steps"], report["weight_decay"] = STEPS, result["skipped"], WEIGHT_DECAY
    report["base_rows_scaled_by"] = result["decay"]  # prod over executed steps of (1 - lr * weight_decay)
    print("\nhooks-mode base-row drift after 200 AdamW steps:\n" + json.dumps(report, indent=2))
    record_property("hooks_drift", json.dumps(report))
    for name, numbers in report.items():
        if isinstance(numbers, dict):
            assert numbers["rows_changed"] == numbers["rows"] and numbers["max_abs_delta"] > 0, name
    # exactly weight decay: each executed step multiplied every base value by (1 - lr * wd)
    for a, b in zip(result["before"], result["after"], strict=True):
        torch.testing.assert_close(b, a * result["decay"], rtol=1e-5, atol=1e-9)


def test_hooks_mode_zeroes_base_row_gradients_and_keeps_upstream_names():
    model, _ = extended_model(tiny_base(), EXTENDED, B, "mean", seed=0, freeze="hooks")
    names = {n for n, _ in model.named_parameters()}
    assert {"text_embedding.weight", "text_head.weight", "text_head.bias"} <= names
    text_loss, mel_loss = model.loss_sums(batch_for(0)).losses()
    (text_loss + mel_loss).backward()
    for param in (model.text_embedding.weight, model.text_head.weight, model.text_head.bias):
        assert param.grad[:B].abs().max() == 0 and param.grad[B:].abs().max() > 0


def test_split_and_hooks_compute_the_same_loss_from_the_same_weights():
    split, _ = extended_model(tiny_base(), EXTENDED, B, "mean", seed=3, freeze="split")
    hooks, _ = extended_model(tiny_base(), EXTENDED, B, "mean", seed=3, freeze="hooks")
    batch = batch_for(5)
    a = split.eval().loss_sums(batch).losses()
    b = hooks.eval().loss_sums(batch).losses()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert upstream_state_dict(split).keys() == upstream_state_dict(hooks).keys()


def test_unknown_freeze_mode_is_refused():
    with pytest.raises(ValueError, match="freeze"):
        UnifiedVoiceGPT(BASE, base_rows=10, freeze="gradients")
