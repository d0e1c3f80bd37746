"""The training loop's parts on their own: when the Checkpointer saves, what the Validator keeps as the best."""

from __future__ import annotations

import time
from types import SimpleNamespace

import fidel_tts.trainer.training.validator as validator_module
import torch
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.training.checkpointer import Checkpointer
from fidel_tts.trainer.training.options import TrainConfig
from fidel_tts.trainer.training.validator import Validator

CPU = torch.device("cpu")


def config(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(["t.jsonl"], ["v.jsonl"], "bpe.model", "config.yaml", str(tmp_path / "out"), **overrides)


def checkpointer(tc: TrainConfig, total_steps: int = 12) -> Checkpointer:
    """decide() needs no model: only the settings, the rank and the schedule's length."""
    return Checkpointer(tc, Dist(), CPU, None, None, None, torch.amp.GradScaler("cpu", enabled=False), {},
                        total_steps)


def test_a_save_is_due_at_the_interval_the_end_a_signal_a_gate_and_a_kept_best(tmp_path):
    saves = checkpointer(config(tmp_path, save_interval=5, keep_best=True))
    assert saves.decide(3, False, False, False) == (None, False)
    assert saves.decide(5, False, False, False) == ("interval", False)
    assert saves.decide(12, False, False, False) == ("interval", False)  # the last step, off the interval
    assert saves.decide(3, True, False, False) == ("signal", True)
    assert saves.decide(3, True, True, False) == ("gate", True)
    assert saves.decide(3, False, False, True) == ("interval", False)
    assert checkpointer(config(tmp_path, save_interval=5, keep_best=False)).decide(3, False, False, True) == \
        (None, False)


def test_a_save_is_due_once_save_minutes_have_passed_without_one(tmp_path):
    saves = checkpointer(config(tmp_path, save_interval=100, save_minutes=1.0))
    assert saves.decide(3, False, False, False) == (None, False)
    saves.last_save_time = time.monotonic() - 61
    assert saves.decide(4, False, False, False) == ("interval", False)


def validator(tc: TrainConfig, gate=lambda step, metrics, history, model: None) -> Validator:
    return Validator(tc, Dist(), CPU, None, None, SimpleNamespace(val_set=None, val_batches=[]), every=5,
                     total_steps=12, on_validation=gate)


def test_the_validator_keeps_the_lowest_weighted_loss_as_the_best(tmp_path, monkeypatch):
    losses = iter([(2.0, 4.0), (1.0, 6.0), (1.0, 3.0)])  # weighted 0.1 text + 1.0 mel: 4.2, 6.1, 3.1
    monkeypatch.setattr(validator_module, "evaluate", lambda *args: dict(
        zip(("val_text_loss", "val_mel_loss"), next(losses), strict=True)))
    check = validator(config(tmp_path, text_loss_weight=0.1, mel_loss_weight=1.0))
    assert [check.due(step) for step in (3, 5, 10, 12)] == [False, True, True, True]
    assert [check.validate(step)[1] for step in (0, 5, 10)] == [True, False, True]
    assert check.best["step"] == 10 and check.best["path"].endswith("ckpt-step00000010.pt")
    assert [row["step"] for row in check.history] == [0, 5, 10]


def test_a_failing_gate_is_the_reason_training_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(validator_module, "evaluate", lambda *args: {"val_text_loss": 1.0, "val_mel_loss": 1.0})
    check = validator(config(tmp_path), gate=lambda step, metrics, history, model: "text loss too high" if step else None)
    check.validate(0)
    assert check.gate_stop() is None
    check.validate(5)
    assert check.gate_stop() == "text loss too high"
