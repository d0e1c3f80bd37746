"""The background checkpoint writer: what it writes is the state at submit, the loop blocks only for the
snapshot, completions run on the caller's thread after the write is durable, and write errors surface."""

from __future__ import annotations

import threading
import time

import fidel_tts.trainer.training.writer as writer_module
import pytest
import torch
from fidel_tts.trainer.training.checkpoint import load_checkpoint, verify_checkpoint
from fidel_tts.trainer.training.writer import AsyncCheckpointWriter


def training_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    history = [{"step": 1, "loss": 2.0}]
    return model, optimizer, history


def test_writes_the_state_as_it_was_at_submit(tmp_path, monkeypatch):
    model, optimizer, history = training_state()
    release = threading.Event()
    real_save = writer_module.save_checkpoint

    def slow_save(*args):
        release.wait(10)
        return real_save(*args)

    monkeypatch.setattr(writer_module, "save_checkpoint", slow_save)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    writer = AsyncCheckpointWriter()
    done = []
    writer.submit(tmp_path, 1, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "val_history": history}, {"metrics": history[-1]}, on_done=done.append)
    # the loop goes on while the write waits: parameters, moments and lists all change in place
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    history.append({"step": 2, "loss": 1.0})
    history[0]["loss"] = 99.0
    assert writer.in_flight and not done and writer.poll() is None
    release.set()
    saved = writer.wait()
    assert done == [saved] and not writer.in_flight
    state, meta = load_checkpoint(saved.path)
    assert all(torch.equal(state["model"][k], v) for k, v in expected_model.items())
    assert not torch.equal(state["model"]["weight"], model.weight.detach())
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], expected_moment)
    assert state["val_history"] == [{"step": 1, "loss": 2.0}] and meta["metrics"] == {"step": 1, "loss": 2.0}


def test_loop_blocks_only_for_the_snapshot(tmp_path, monkeypatch):
    model, optimizer, _ = training_state()
    real_save = writer_module.save_checkpoint

    def slow_save(*args):
        time.sleep(0.5)
        return real_save(*args)

    monkeypatch.setattr(writer_module, "save_checkpoint", slow_save)
    writer = AsyncCheckpointWriter()
    timing = writer.submit(tmp_path, 1, {"model": model.state_dict()}, {})
    assert timing.blocked_s < 0.25 and timing.waited_s < 0.05
    second = writer.submit(tmp_path, 2, {"model": model.state_dict()}, {})  # waits for the first write
    assert second.waited_s > 0.2
    writer.wait()
    assert timing.write_s >= 0.5
    for step in (1, 2):
        verify_checkpoint(tmp_path / f"ckpt-step{step:08d}.pt")

    sync = AsyncCheckpointWriter(background=False)
    done = []
    blocking = sync.submit(tmp_path, 3, {"model": model.state_dict()}, {}, on_done=done.append)
    assert blocking.blocked_s >= 0.5 and len(done) == 1 and not sync.in_flight


def test_completion_runs_on_the_callers_thread_after_the_file_is_durable(tmp_path):
    model, _, _ = training_state()
    writer = AsyncCheckpointWriter()
    seen = []

    def on_done(saved):
        verify_checkpoint(saved.path)  # sha256 in the sidecar matches the file: fully written
        seen.append(threading.current_thread())

    writer.submit(tmp_path, 5, {"model": model.state_dict()}, {}, on_done=on_done)
    deadline = time.monotonic() + 10
    while writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [threading.main_thread()]


def test_a_failed_write_raises_in_the_loop_and_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(writer_module, "save_checkpoint", broken)
    writer = AsyncCheckpointWriter()
    done = []
    writer.submit(tmp_path, 1, {"w": torch.ones(2)}, {}, on_done=done.append)
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    assert not done and not list(tmp_path.iterdir())
    assert writer.wait() is None  # the error is raised once


@pytest.mark.slow
def test_training_with_background_saves_matches_synchronous_saves(tiny_project, make_train_config, tmp_path):
    from fidel_tts.trainer.training.hooks import TrainHooks
    from fidel_tts.trainer.training.trainer import train

    committed = {}
    results = {}
    for mode in (True, False):
        rows = []
        hooks = TrainHooks(on_commit=rows.extend)
        tc = make_train_config(tiny_project, tmp_path / f"async{mode}", max_steps=6, save_interval=2, async_save=mode)
        results[mode] = train(tc, hooks)
        committed[mode] = [step for step, _ in rows]
    for mode in (True, False):
        assert results[mode].status == "completed" and results[mode].checkpoint.name == "ckpt-step00000006.pt"
    assert committed[True] == committed[False]
    fast, slow = (load_checkpoint(results[m].checkpoint)[0] for m in (True, False))
    assert all(torch.equal(fast["model"][k], slow["model"][k]) for k in slow["model"])
