"""The layout fixture: a random-weight checkpoint with the official gpt.pth's exact layout. At full size it goes
load → extend to 24000 → one training step → export, and the export's keys and shapes are the reference list
with 24001 text rows, its base rows and pass-through tensors byte-identical to the fixture."""

import gc
import json
import time
from pathlib import Path

import pytest
import torch
from fidel_tts.trainer.model.config import (
    gpt_config_from_dict,
    load_gpt_config,
    read_config_yaml,
    write_config_yaml,
)
from fidel_tts.trainer.model.gpt import Batch
from fidel_tts.trainer.model.vocab import extended_model
from fidel_tts.trainer.model.weights import (
    export_problems,
    export_state_dict,
    load_base_checkpoint,
    read_state_dict,
    upstream_layout,
)
from fidel_tts.trainer.training.optim import make_optimizer, param_groups
from fidel_tts.trainer.training.options import TrainConfig
from fidel_tts.trainer.training.step import optimizer_step

from tests.fixtures.layout_fixture import RELEASE_GPT, SMALL_CONDITIONING, config_dict, write_layout_fixture
from tests.fixtures.synthetic import tiny_config_dict

REFERENCE_KEYS = Path(__file__).resolve().parents[1] / "data" / "indextts2_gpt_state_dict.json"


def reference_layout(text_rows: int) -> list[tuple[str, tuple[int, ...]]]:
    keys = json.loads(REFERENCE_KEYS.read_text())["keys"]
    grown = ("text_embedding.weight", "text_head.weight", "text_head.bias")
    return [(k["name"], (text_rows, *k["shape"][1:]) if k["name"] in grown else tuple(k["shape"])) for k in keys]


def test_small_fixture_has_the_configs_layout_and_distinct_rows(tmp_path):
    gpt = {**tiny_config_dict(50)["gpt"], **SMALL_CONDITIONING}
    fixture = write_layout_fixture(tmp_path, gpt, seed=3)
    state = torch.load(fixture.checkpoint, weights_only=True)
    layout = upstream_layout(gpt_config_from_dict(gpt), gpt)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == list(layout.items())
    assert all(v.dtype == torch.float32 for v in state.values())
    assert read_config_yaml(fixture.config) == config_dict(gpt)
    emb = state["text_embedding.weight"]
    assert len({tuple(row.tolist()) for row in emb}) == len(emb)  # no two rows alike
    assert 0.015 < float(emb.std()) < 0.025
    again = torch.load(write_layout_fixture(tmp_path / "again", gpt, seed=3).checkpoint, weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)


@pytest.fixture(scope="module")
def full_fixture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full_layout")
    started = time.monotonic()
    fixture = write_layout_fixture(folder)
    yield fixture, time.monotonic() - started
    fixture.checkpoint.unlink()  # 3.5 GB: pytest keeps its last temp folders around


@pytest.mark.slow
def test_full_size_load_extend_step_export_matches_the_reference(full_fixture, tmp_path, record_property):
    fixture, write_s = full_fixture
    assert (fixture.keys, fixture.values) == (665, 871_100_639)
    timings = {"write_fixture": write_s}
    clock = time.monotonic()

    def lap(name):
        nonlocal clock
        now = time.monotonic()
        timings[name] = now - clock
        clock = now

    raw = read_config_yaml(fixture.config)
    base = load_base_checkpoint(fixture.checkpoint, load_gpt_config(fixture.config), raw["gpt"])
    assert base.base_rows == 12000 and (len(base.training), len(base.passthrough)) == (301, 364)
    lap("load")
    cfg = gpt_config_from_dict(RELEASE_GPT).with_text_tokens(24000)
    model, record = extended_model(base, cfg, base.base_rows, "mean", seed=0)
    assert record.base_rows == 12000 and record.total_rows == 24001
    lap("extend")

    tc = TrainConfig([], [], "", "", "", learning_rate=1e-5, new_rows_lr=1e-4)
    groups = param_groups(model, tc.learning_rate, tc.new_rows_lr, tc.weight_decay)
    optimizer = make_optimizer(groups, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randint(2, 24000, (1, 8), generator=g), torch.tensor([8]),
                  torch.randint(0, 8192, (1, 16), generator=g), torch.tensor([16]),
                  torch.randn(1, 32, 1280, generator=g), torch.randn(1, 1280, generator=g))
    model.train()
    text_loss, mel_loss = model.loss_sums(batch).losses()
    assert abs(text_loss.item() - 10.086) < 0.05  # ln(24001): chance level over 24001 rows
    (tc.text_loss_weight * text_loss + tc.mel_loss_weight * mel_loss).backward()
    before = base.training["gpt.h.0.attn.c_attn.weight"].clone()
    optimizer_step(model, optimizer, scheduler, scaler, tc)
    assert not torch.equal(model.gpt.h[0].attn.c_attn.weight.detach(), before)  # the step did train
    del optimizer, scheduler, before
    gc.collect()
    lap("one_step")

    out = tmp_path / "export"
    out.mkdir()
    torch.save(export_state_dict(model, base), out / "gpt.pth")
    write_config_yaml(raw, out / "config.yaml", cfg.number_text_tokens)
    del model
    gc.collect()
    lap("export")

    written = None
    try:
        written = read_state_dict(out / "gpt.pth")
        assert [(k, tuple(v.shape)) for k, v in written.items()] == reference_layout(24001)
        assert export_problems(written, base, 24001) == []  # base rows and pass-through byte-identical
        assert load_gpt_config(out / "config.yaml").number_text_tokens == 24000
        lap("check")
    finally:
        del written
        (out / "gpt.pth").unlink()
    print("\nfull-size layout fixture, seconds: " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    record_property("full_size_timings_s", json.dumps(timings))
