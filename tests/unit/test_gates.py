"""Gates on real tiny runs: a run at learning rate 0 fails "validation improves" and "new rows learning", one with
NaN weights fails "finite" at its first validation and stops; plus the pure gates' edges."""

from __future__ import annotations

import math

import pytest
import torch
from fidel_tts.trainer.evaluation.gates import (
    GateConfig,
    finite,
    inference_smoke,
    new_row_ids,
    new_rows_learning,
    new_rows_of,
    not_diverging,
    text_loss_gate,
    validation_gates,
    validation_hook,
    validation_improves,
)
from fidel_tts.trainer.model.weights import torch_load
from fidel_tts.trainer.training.build import build_model
from fidel_tts.trainer.training.hooks import TrainHooks
from fidel_tts.trainer.training.trainer import train


def used_rows(tc, base_rows):
    from fidel_tts.trainer.data.loader import training_data

    data = training_data(tc.train_manifests, tc.val_manifests, tc.batch_size, tc.seed, tokenizer=tc.tokenizer)
    return new_row_ids([data.train_set[i].text_ids for i in range(len(data.train_set))], base_rows)


def end_gates(tc, result):
    init = build_model(tc)
    final = torch_load(result.checkpoint)["model"]
    b = init.base_rows
    history = result.val_history
    return [validation_improves(history[0]["val_text_loss"], history[-1]["val_text_loss"]),
            new_rows_learning(new_rows_of(dict(init.model.state_dict()), b), new_rows_of(final, b),
                              used_rows(tc, b))]


@pytest.mark.slow
def test_learning_rate_zero_fails_validation_improves_and_new_rows_learning(tiny_project, make_train_config,
                                                                           tmp_path):
    frozen = make_train_config(tiny_project, tmp_path / "lr0", max_steps=6, learning_rate=0.0, val_interval=3)
    improves, learning = end_gates(frozen, train(frozen))
    assert not improves.passed and "did not fall" in improves.reason
    assert not learning.passed and learning.value.startswith("0/")
    live = make_train_config(tiny_project, tmp_path / "live", max_steps=6, val_interval=3)
    improves, learning = end_gates(live, train(live))
    assert improves.passed and learning.passed, (improves.line(), learning.line())


@pytest.mark.slow
def test_nan_weights_fail_finite_and_stop_training(tiny_project, make_train_config, tmp_path):
    state = torch.load(tiny_project.base_checkpoint, weights_only=True)
    state["mel_head.bias"][3] = float("nan")
    torch.save(state, tiny_project.base_checkpoint)
    tc = make_train_config(tiny_project, tmp_path / "nan", max_steps=6, val_interval=3)
    seen = []
    hook = validation_hook(GateConfig(), on_results=lambda step, results: seen.append((step, results)))
    result = train(tc, TrainHooks(on_validation=hook))
    assert result.status == "failed" and "gate finite failed" in result.reason and result.step <= 1
    step, results = seen[0]
    assert step == 0 and not next(r for r in results if r.name == "finite").passed


def test_pure_gates_edges():
    assert finite({"a": 1.0}).passed and not finite({"a": math.inf}).passed
    assert not not_diverging([1.0, 0.5, 1.2]).passed and not_diverging([1.0, 0.5, 0.9]).passed
    assert text_loss_gate(3.5, 10, 3.0, 100).reason == "pending"
    assert not text_loss_gate(3.5, 100, 3.0, 100).passed and text_loss_gate(2.9, 100, 3.0, 100).passed
    init = torch.zeros(4, 2)
    moved = init.clone()
    moved[1] += 0.1
    assert new_rows_learning(init, moved, [1]).passed and not new_rows_learning(init, moved, [0, 1, 2]).passed
    assert new_row_ids([[1, 5, 7], [9]], 5) == [0, 2, 4]
    ok = inference_smoke([(50, True, 48), (30, True, 40)])
    assert ok.passed and "2/2 stopped" in ok.value
    never = inference_smoke([(50, True, 48), (300, False, 40)])
    assert not never.passed and "never emitted the stop code" in never.reason
    assert not inference_smoke([(1, True, 48)]).passed  # stopped at once: outside the length bound


def test_validation_gates_arm_the_text_loss_gate_only_when_asked():
    metrics = {"val_text_loss": 4.0, "val_mel_loss": 2.0}
    history = [{"step": 0, **metrics}]
    names = [r.name for r in validation_gates(GateConfig(), 0, metrics, history, None)]
    assert names == ["finite", "not_diverging"]
    armed = GateConfig(text_loss_threshold=3.0, text_loss_by_step=10)
    last = validation_gates(armed, 10, metrics, history, None)[-1]
    assert last.name == "text_loss" and not last.passed
