import os
import signal

import pytest
import torch

from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.errors import FidelError
from trainer.export import export_model
from trainer.gates import exported_base_rows_identical
from trainer.optim import lr_factor
from trainer.train import TrainHooks, train
from trainer.weights import torch_load


def test_losses_fall_and_base_rows_stay_bit_identical(tiny_project, make_train_config, tmp_path):
    result = train(make_train_config(tiny_project, tmp_path / "out"))
    assert result.status == "completed" and result.step == 30
    first, last = result.val_history[0], result.val_history[-1]
    assert last["val_text_loss"] < first["val_text_loss"]
    assert last["val_mel_loss"] < first["val_mel_loss"]
    exported = export_model(result.checkpoint, tmp_path / "export")
    base_rows = result.lineage["base_rows"]
    assert exported_base_rows_identical(tiny_project.base_checkpoint, exported.gpt, base_rows).passed
    base = torch_load(tiny_project.base_checkpoint)
    new = torch_load(exported.gpt)
    assert torch.equal(base["text_head.bias"][:base_rows], new["text_head.bias"][:base_rows])
    assert not torch.equal(base["mel_head.weight"], new["mel_head.weight"])  # the rest did train
    assert new["text_embedding.weight"].shape[0] == tiny_project.cfg.text_rows


def test_sigterm_saves_and_resume_is_bit_exact(tiny_project, make_train_config, tmp_path):
    """40 steps straight vs 17 steps, SIGTERM, resume to 40: bucketed sampler, accumulation 2, dropout on."""
    settings = dict(max_steps=40, grad_accumulation=2, save_interval=100, log_interval=1)
    straight_rows, resumed_rows = [], []
    straight = train(make_train_config(tiny_project, tmp_path / "a", **settings),
                     TrainHooks(on_commit=straight_rows.extend))

    def preempt(step, total, metrics):
        if step == 17:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train(make_train_config(tiny_project, tmp_path / "b", **settings),
                    TrainHooks(on_progress=preempt, on_commit=resumed_rows.extend))
    assert stopped.status == "preempted" and stopped.step == 17
    resumed = train(make_train_config(tiny_project, tmp_path / "b", resume="auto", **settings),
                    TrainHooks(on_commit=resumed_rows.extend))
    assert resumed.resumed_from == 17 and resumed.step == 40
    a, _ = load_checkpoint(straight.checkpoint)
    b, _ = load_checkpoint(resumed.checkpoint)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"]
    assert straight.val_history == resumed.val_history

    def losses(rows):
        return {(step, k): v for step, m in rows for k, v in m.items() if k.endswith(("_loss", "_top1"))}

    assert losses(straight_rows) == losses(resumed_rows)


def test_resume_with_another_batch_size_warns_and_records_the_rule(tiny_project, make_train_config, tmp_path):
    warnings = []
    train(make_train_config(tiny_project, tmp_path / "out", max_steps=10, save_interval=10))
    result = train(make_train_config(tiny_project, tmp_path / "out", max_steps=20, batch_size=4, resume="auto"),
                   TrainHooks(on_warning=warnings.append))
    assert result.status == "completed" and result.step == 20
    assert len(warnings) == 1 and "effective batch changed at step 10" in warnings[0]
    change = result.lineage["batch_changes"][0]
    assert change["from"]["batch_size"] == 8 and change["to"]["batch_size"] == 4 and "schedule" in change["rule"]
    assert result.lineage["schedule_total_steps"] == 10  # the LR schedule is the lineage's; it never rises again


def test_the_best_validation_checkpoint_is_kept(tiny_project, make_train_config, tmp_path, monkeypatch):
    import trainer.train as train_module

    scores = iter([5.0, 1.0, 4.0, 3.0, 2.0, 6.0, 7.0, 8.0])  # validation at steps 0, 5, 10, …: best at step 5
    original = train_module.evaluate

    def scripted(*args):
        metrics = original(*args)
        return {**metrics, "val_mel_loss": next(scores)}

    monkeypatch.setattr(train_module, "evaluate", scripted)
    result = train(make_train_config(tiny_project, tmp_path / "out", val_interval=5, save_interval=10, keep_last=1))
    kept = [p.name for p in list_checkpoints(tmp_path / "out")]
    assert kept == ["ckpt-step00000030.pt", "ckpt-step00000005.pt"]
    assert result.status == "completed"


def test_a_resume_commits_every_step_and_replays_only_identical_rows(tiny_project, make_train_config, tmp_path):
    """Rows are committed with their checkpoint; a resume replays the last checkpoint's rows (a kill may have
    fallen between save and commit), identical, so a logger that drops known (step, metric) pairs stays clean."""
    logged = []
    hooks = TrainHooks(on_commit=logged.extend,
                       on_progress=lambda step, total, m: step == 15 and os.kill(os.getpid(), signal.SIGTERM))
    cfg = make_train_config(tiny_project, tmp_path / "out")
    assert train(cfg, hooks).status == "preempted"
    cfg.resume = "auto"
    train(cfg, TrainHooks(on_commit=logged.extend))
    seen = {}
    for step, metrics in logged:
        for key, value in metrics.items():
            assert seen.setdefault((step, key), value) == value, (step, key)
    assert {step for step, _ in seen} >= {0, 5, 10, 15, 20, 25, 30}


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tiny_project, make_train_config, tmp_path):
    train(make_train_config(tiny_project, tmp_path / "out", max_steps=10))
    with pytest.raises(FidelError, match="already holds checkpoints"):
        train(make_train_config(tiny_project, tmp_path / "out", max_steps=10))


def test_keeps_only_the_last_checkpoints(tiny_project, make_train_config, tmp_path):
    train(make_train_config(tiny_project, tmp_path / "out", save_interval=5, keep_last=2))
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["ckpt-step00000030.pt", "ckpt-step00000025.pt"]


def test_non_finite_loss_fails_without_saving(tiny_project, make_train_config, tmp_path, monkeypatch):
    from trainer import model as model_module

    original = model_module.UnifiedVoiceGPT.loss_sums

    def poisoned(self, batch):
        sums = original(self, batch)
        sums.mel_ce = sums.mel_ce * float("nan")
        return sums

    monkeypatch.setattr(model_module.UnifiedVoiceGPT, "loss_sums", poisoned)
    result = train(make_train_config(tiny_project, tmp_path / "out"))
    assert result.status == "failed" and "non-finite" in result.reason
    assert list_checkpoints(tmp_path / "out") == []


def test_schedule_warms_up_decays_and_never_rises_again():
    values = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(300)]
    assert values[0] < values[9] < values[10] and values[10] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(values[10:], values[11:], strict=False))
    assert values[150] == pytest.approx(0.1) and values[299] == pytest.approx(0.1)


def test_bad_inputs_name_the_file(tiny_project, make_train_config, tmp_path):
    broken = tmp_path / "gpt.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(FidelError, match=str(broken)):
        train(make_train_config(tiny_project, tmp_path / "out", base_checkpoint=str(broken)))
    with pytest.raises(FidelError, match="manifest not found"):
        train(make_train_config(tiny_project, tmp_path / "out", train_manifests=[str(tmp_path / "nope.jsonl")]))
