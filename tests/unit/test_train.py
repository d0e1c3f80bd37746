import os
import signal

import pytest
import torch
from fidel_tts.trainer.checkpoints.export import export_model
from fidel_tts.trainer.data.loader import training_data
from fidel_tts.trainer.data.manifest import BucketBatchSampler
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.evaluation.gates import exported_base_rows_identical
from fidel_tts.trainer.model.weights import torch_load
from fidel_tts.trainer.training.checkpoint import list_checkpoints, load_checkpoint
from fidel_tts.trainer.training.hooks import TrainHooks
from fidel_tts.trainer.training.optim import lr_factor
from fidel_tts.trainer.training.trainer import train


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


def straight_and_resumed(project, make_train_config, tmp_path, stop_at: int, **settings):
    """The same run straight through, and stopped by SIGTERM at stop_at then resumed: results and logged rows."""
    straight_rows, resumed_rows = [], []
    straight = train(make_train_config(project, tmp_path / "a", **settings),
                     TrainHooks(on_commit=straight_rows.extend))

    def preempt(step, total, metrics):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train(make_train_config(project, tmp_path / "b", **settings),
                    TrainHooks(on_progress=preempt, on_commit=resumed_rows.extend))
    assert stopped.status == "preempted" and stopped.step == stop_at
    resumed = train(make_train_config(project, tmp_path / "b", resume="auto", **settings),
                    TrainHooks(on_commit=resumed_rows.extend))
    assert resumed.resumed_from == stop_at and resumed.step == settings["max_steps"]
    return straight, straight_rows, resumed, resumed_rows


def assert_same_training(straight, straight_rows, resumed, resumed_rows) -> None:
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


def test_sigterm_saves_and_resume_is_bit_exact(tiny_project, make_train_config, tmp_path):
    """40 steps straight vs 17 steps, SIGTERM, resume to 40: bucketed sampler, accumulation 2, dropout on."""
    settings = dict(max_steps=40, grad_accumulation=2, save_interval=100, log_interval=1)
    assert_same_training(*straight_and_resumed(tiny_project, make_train_config, tmp_path, 17, **settings))


def test_resume_under_a_token_budget_is_bit_exact(tiny_project, make_train_config, tmp_path):
    """Batches of 5-13 pairs under a 400-token budget: stopped mid-epoch at step 5, resumed to 12, exact."""
    settings = dict(max_steps=12, grad_accumulation=2, batch_tokens=400, save_interval=100, log_interval=1,
                    val_interval=4)
    data = training_data([tiny_project.train_manifest], [tiny_project.val_manifest], 8, 1234, max_tokens=400)
    assert len({len(b) for b in data.sampler.epoch_batches(0)}) > 2  # the budget does vary the batch size
    straight, *rest = straight_and_resumed(tiny_project, make_train_config, tmp_path, 5, **settings)
    assert straight.lineage["effective_batch"]["batch_tokens"] == 400
    assert_same_training(straight, *rest)


def test_a_batch_change_converts_the_position_under_the_old_token_budget(tiny_project, make_train_config,
                                                                        tmp_path):
    data = training_data([tiny_project.train_manifest], [tiny_project.val_manifest], 8, 1234)
    budgeted = BucketBatchSampler(*data.train_set.lengths(), 8, seed=1234, max_tokens=800)
    old_len, new_len = len(budgeted.epoch_batches(0)), len(data.sampler.epoch_batches(0))
    assert old_len != new_len
    train(make_train_config(tiny_project, tmp_path / "out", max_steps=2, save_interval=2, batch_tokens=800))
    warnings = []
    result = train(make_train_config(tiny_project, tmp_path / "out", max_steps=4, resume="auto"),
                   TrainHooks(on_warning=warnings.append))
    assert result.status == "completed" and len(warnings) == 1
    change = result.lineage["batch_changes"][0]
    assert change["from"]["batch_tokens"] == 800 and "batch_tokens" not in change["to"]
    assert f"micro-batch 2/{old_len} → {2 * new_len // old_len}/{new_len}" in change["rule"]


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
    import fidel_tts.trainer.training.validator as validator_module

    scores = iter([5.0, 1.0, 4.0, 3.0, 2.0, 6.0, 7.0, 8.0])  # validation at steps 0, 5, 10, …: best at step 5
    original = validator_module.evaluate

    def scripted(*args):
        metrics = original(*args)
        return {**metrics, "val_mel_loss": next(scores)}

    monkeypatch.setattr(validator_module, "evaluate", scripted)
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
    from fidel_tts.trainer.model import gpt as model_module

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


def tiny_step_setup(device: str, fused: bool):
    """A 2-layer model, its optimizer and a watch, as the training loop builds them (fused: as on CUDA)."""
    from fidel_tts.trainer.model.config import GPTConfig
    from fidel_tts.trainer.model.gpt import UnifiedVoiceGPT
    from fidel_tts.trainer.process import Dist
    from fidel_tts.trainer.training.metrics import MetricWindow, NonFiniteWatch
    from fidel_tts.trainer.training.optim import param_groups
    from fidel_tts.trainer.training.options import TrainConfig
    from fidel_tts.trainer.training.step import LossModel, skips_on_device

    cfg = GPTConfig(model_dim=32, layers=2, heads=2, max_text_tokens=40, max_mel_tokens=80, number_text_tokens=60,
                    number_mel_codes=34, start_mel_token=32, stop_mel_token=33)
    torch.manual_seed(0)
    model = UnifiedVoiceGPT(cfg, base_rows=40).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, 1e-2, 0.1), fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device, enabled=False)
    watch = NonFiniteWatch(torch.device(device), Dist(), on_device=skips_on_device(optimizer))
    tc = TrainConfig([], [], "", "", "")
    return model, LossModel(model), optimizer, scheduler, scaler, watch, tc, MetricWindow(torch.device(device))


def tiny_batch(poisoned: bool = False):
    from fidel_tts.trainer.model.gpt import Batch

    g = torch.Generator().manual_seed(0)
    condition = torch.randn(2, 32, 32, generator=g)
    if poisoned:
        condition[0, 0, 0] = float("nan")
    return Batch(torch.randint(3, 60, (2, 6), generator=g), torch.tensor([6, 4]),
                 torch.randint(0, 32, (2, 20), generator=g), torch.tensor([20, 11]), condition,
                 torch.randn(2, 32, generator=g))


def run_step(setup, step: int, poisoned: bool = False) -> torch.Tensor:
    from fidel_tts.trainer.process import Dist
    from fidel_tts.trainer.training.step import accumulate, optimizer_step

    model, wrapped, optimizer, scheduler, scaler, watch, tc, window = setup
    device = next(model.parameters()).device
    losses = accumulate(wrapped, [(step, tiny_batch(poisoned))], tc, 0, device, None, scaler, window, Dist())
    return optimizer_step(model, optimizer, scheduler, scaler, tc, watch, losses, step)


@pytest.mark.parametrize("device,fused", [("cpu", False), ("cpu", True), pytest.param("cuda", True, marks=pytest.mark.gpu)])
def test_a_non_finite_step_moves_no_weight(device, fused):
    """foreach AdamW: the step is not taken and the watch says so at once. Fused AdamW (CUDA's): skipped on the
    device, and every step after it too until the loop reads the watch."""
    setup = tiny_step_setup(device, fused)
    model, optimizer, watch = setup[0], setup[2], setup[5]
    assert watch.on_device == fused
    run_step(setup, 1)
    assert watch.failure() is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        run_step(setup, 2, poisoned=True)
        if fused:
            run_step(setup, 3)  # a finite step after the bad one: still skipped
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(int(s["step"]) == 1 for s in optimizer.state.values())
    assert watch.failure().startswith("non-finite loss at step 2 (text ")


def test_an_infinite_loss_with_finite_gradients_still_poisons_them():
    from fidel_tts.trainer.training.step import nan_unless_finite

    x = torch.tensor(1.0, requires_grad=True)
    (x + float("inf")).backward()
    assert x.grad == 1.0  # finite: a check of the gradients alone would let this step through
    x.grad = None
    nan_unless_finite(x + float("inf")).backward()
    assert x.grad.isnan()
    y = torch.tensor(3.0, requires_grad=True)
    nan_unless_finite(y * 2).backward()
    assert y.grad == 2.0


def test_a_non_finite_step_skipped_on_the_device_fails_at_the_next_flush(tiny_project, make_train_config, tmp_path,
                                                                         monkeypatch):
    """The CUDA path on CPU (fused AdamW): step 3 is bad, the loop notices at its log flush at step 5."""
    import fidel_tts.trainer.training.trainer as train_module
    from fidel_tts.trainer.model import gpt as model_module

    monkeypatch.setattr(train_module, "make_optimizer",
                        lambda groups, device: torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=True))
    original, calls = model_module.UnifiedVoiceGPT.loss_sums, []

    def poisoned_at_step_3(self, batch):
        sums = original(self, batch)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                sums.mel_ce = sums.mel_ce * float("nan")
        return sums

    monkeypatch.setattr(model_module.UnifiedVoiceGPT, "loss_sums", poisoned_at_step_3)
    progress = []
    result = train(make_train_config(tiny_project, tmp_path / "out", log_interval=5),
                   TrainHooks(on_progress=lambda step, total, metrics: progress.append(step)))
    assert result.status == "failed" and result.reason.startswith("non-finite loss at step 3 (text ")
    assert result.step == 5 and progress == [] and len(calls) == 5
    assert list_checkpoints(tmp_path / "out") == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_train_like_eager_and_save_the_same_keys(tiny_project, make_train_config, tmp_path,
                                                                 checkpointing):
    """Inductor on CPU (it needs a C++ compiler): a few steps with compiled blocks match eager to float rounding."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    settings = dict(max_steps=4, log_interval=1, val_interval=4, save_interval=4,
                    activation_checkpointing=checkpointing)
    eager_rows, compiled_rows = [], []
    eager = train(make_train_config(tiny_project, tmp_path / "eager", **settings),
                  TrainHooks(on_commit=eager_rows.extend))
    counters.clear()
    try:
        with inductor_config.patch(fallback_random=True):  # eager's RNG ops: the same dropout masks
            compiled = train(make_train_config(tiny_project, tmp_path / "compiled", compile=True, **settings),
                             TrainHooks(on_commit=compiled_rows.extend))
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    assert eager.status == compiled.status == "completed"
    a, _ = load_checkpoint(eager.checkpoint)
    b, _ = load_checkpoint(compiled.checkpoint)
    assert list(a["model"]) == list(b["model"])
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    def loss_points(rows):
        return {(step, k): v for step, m in rows for k, v in m.items() if k.endswith("_loss")}

    eager_losses, compiled_losses = loss_points(eager_rows), loss_points(compiled_rows)
    assert eager_losses.keys() == compiled_losses.keys() and len(eager_losses) >= 8
    for key, value in eager_losses.items():
        assert compiled_losses[key] == pytest.approx(value, rel=1e-4), key


@pytest.mark.gpu
@pytest.mark.parametrize("amp,compile", [("off", False), ("bf16", False), ("fp16", False), ("bf16", True)])
def test_cuda_steps_between_flushes_make_no_host_sync(tiny_project, make_train_config, tmp_path, monkeypatch, amp,
                                                      compile):
    """Every step between two metric flushes runs under torch.cuda.set_sync_debug_mode("error"): a host sync
    there (an .item(), a boolean mask index, a blocking copy) raises."""
    import fidel_tts.trainer.training.trainer as train_module

    original_failure, original_step, strict_steps = train_module.NonFiniteWatch.failure, train_module.optimizer_step, []

    def flush(self):  # the flush reads the device: leave strict mode first
        torch.cuda.set_sync_debug_mode("default")
        return original_failure(self)

    def counted_step(*args):
        strict_steps.append(torch.cuda.get_sync_debug_mode() == 2)
        return original_step(*args)

    monkeypatch.setattr(train_module.NonFiniteWatch, "failure", flush)
    monkeypatch.setattr(train_module, "optimizer_step", counted_step)
    strict = TrainHooks(on_progress=lambda step, total, metrics: torch.cuda.set_sync_debug_mode("error"))
    try:  # 6 steps per epoch: step 7 starts a new epoch (and loader) in strict mode
        result = train(make_train_config(tiny_project, tmp_path / "out", device="cuda", amp=amp, compile=compile,
                                         max_steps=12, log_interval=4, val_interval=12, save_interval=12), strict)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        if compile:
            torch._dynamo.reset()
    assert result.status == "completed" and result.step == 12
    assert sum(strict_steps) == 8  # steps 5-8 and 9-12


@pytest.mark.gpu
def test_cuda_batches_arrive_pinned(tiny_project):
    from fidel_tts.trainer.training.options import TrainConfig
    from fidel_tts.trainer.training.step import micro_batch_loader

    data = training_data([tiny_project.train_manifest], [tiny_project.val_manifest], 8, 1234)
    tc = TrainConfig([], [], "", "", "")
    batch = next(micro_batch_loader(data.train_set, data.sampler.epoch_batches(0), tc, torch.device("cuda")))
    assert all(t.is_pinned() for t in batch.tensors()) and batch.scored is not None
    cpu_batch = next(micro_batch_loader(data.train_set, data.sampler.epoch_batches(0), tc, torch.device("cpu")))
    assert not any(t.is_pinned() for t in cpu_batch.tensors())
