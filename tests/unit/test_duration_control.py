"""Duration-control training (`--duration-control`): prefix position 32 holds mel_pos_embedding(min(code length,
last position)) and, in training and validation, speed_emb(0) instead with probability 0.3 per item."""

import torch
from fidel_tts.trainer.data.manifest import Example, collate
from fidel_tts.trainer.model.config import GPTConfig
from fidel_tts.trainer.model.gpt import Batch, UnifiedVoiceGPT
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.training.metrics import evaluate

CFG = GPTConfig(model_dim=16, layers=1, heads=2, max_text_tokens=20, max_mel_tokens=40, number_text_tokens=30,
                number_mel_codes=34, start_mel_token=32, stop_mel_token=33)


def model(duration_control: bool, p: float = 0.3) -> UnifiedVoiceGPT:
    torch.manual_seed(0)
    return UnifiedVoiceGPT(CFG, base_rows=10, duration_control=duration_control, duration_dropout=p)


def batch(code_lengths: list[int]) -> Batch:
    n, g = len(code_lengths), torch.Generator().manual_seed(1)
    width = max(code_lengths)
    return Batch(torch.randint(2, 31, (n, 5), generator=g), torch.full((n,), 5), torch.randint(0, 32, (n, width),
                 generator=g), torch.tensor(code_lengths), torch.randn(n, 32, 16, generator=g),
                 torch.randn(n, 16, generator=g))


def test_without_duration_control_the_slot_is_speed_emb_1():
    m = model(False).train()
    slot = m.duration_slot(torch.tensor([3, 17, 40]))
    assert torch.equal(slot, m.speed_emb.weight[1].expand(3, -1))


def test_the_slot_is_the_code_length_position_clamped_to_the_table():
    m = model(True).eval()
    lengths = torch.tensor([0, 7, 42, 5000])
    last = CFG.mel_positions - 1  # 1817 at the release config
    expected = m.mel_pos_embedding.emb.weight[torch.tensor([0, 7, 42, last])]
    assert torch.equal(m.duration_slot(lengths), expected)


def test_in_training_about_30_percent_fall_back_to_speed_emb_0():
    m = model(True).train()
    torch.manual_seed(3)
    lengths = torch.randint(1, 40, (20000,))
    slot = m.duration_slot(lengths)
    free = (slot == m.speed_emb.weight[0]).all(1)
    assert abs(free.float().mean().item() - 0.3) < 0.015
    assert torch.equal(slot[~free], m.mel_pos_embedding.emb.weight[lengths[~free]])
    assert (model(True, p=1.0).train().duration_slot(lengths) == m.speed_emb.weight[0]).all()
    assert torch.equal(model(True, p=0.0).train().duration_slot(lengths), m.mel_pos_embedding.emb.weight[lengths])


def test_duration_control_changes_the_forward_and_routes_gradient_to_the_length_position():
    b = batch([12, 30])
    plain, timed = model(False).eval(), model(True).eval()
    assert not torch.equal(plain(b)[2], timed(b)[2])
    timed = model(True, p=0.0).train()
    text_loss, mel_loss = timed.loss_sums(b).losses()
    (text_loss + mel_loss).backward()
    assert timed.speed_emb.weight.grad[1].abs().max() == 0  # speed_emb(1) is no longer used
    assert timed.speed_emb.weight.grad[0].abs().max() > 0


def test_the_slot_draws_random_numbers_only_when_duration_control_is_on():
    """Default runs keep their RNG stream (bit-exact resume compares two runs draw for draw)."""
    lengths = torch.tensor([12, 30])
    torch.manual_seed(9)
    reference = torch.rand(1)
    for m, draws in ((model(False).train(), False), (model(True).eval(), False), (model(True).train(), True)):
        torch.manual_seed(9)
        m.duration_slot(lengths)
        assert torch.equal(torch.rand(1), reference) != draws


def test_train_option_builds_the_model_with_it_and_records_it(tiny_project, make_train_config, tmp_path):
    from fidel_tts.trainer.training.build import build_model
    from fidel_tts.trainer.training.trainer import train

    tc = make_train_config(tiny_project, tmp_path / "out", max_steps=2, save_interval=2, duration_control=True)
    assert build_model(tc).model.duration_control
    result = train(tc)
    assert result.status == "completed", result.reason
    assert result.lineage["duration_control"] is True


def val_examples(n: int) -> list[Example]:
    g = torch.Generator().manual_seed(5)
    return [Example(torch.randint(2, 31, (4 + i % 3,), generator=g), torch.randint(0, 32, (6 + i,), generator=g),
                    torch.randn(32, 16, generator=g), torch.randn(16, generator=g)) for i in range(n)]


def test_validation_drops_the_slot_as_training_does_from_a_seed_per_batch():
    examples, batches = val_examples(12), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    timed = model(True, p=0.5).train()
    torch.manual_seed(7)
    rng_before = torch.get_rng_state()
    first = evaluate(timed, examples, batches, torch.device("cpu"), None, Dist())
    assert torch.equal(torch.get_rng_state(), rng_before)  # training's random stream is untouched
    assert timed.training and not timed.drop_duration_in_eval
    assert evaluate(timed, examples, batches, torch.device("cpu"), None, Dist()) == first
    never = model(True, p=0.0)
    assert evaluate(never, examples, batches, torch.device("cpu"), None, Dist()) != first
    # the draws of val batch i come from seed i, whichever rank validates it
    manual = []
    with torch.no_grad():
        timed.eval()
        timed.drop_duration_in_eval = True
        for index, batch in enumerate(batches):
            torch.manual_seed(index)
            manual.append(timed.loss_sums(collate([examples[i] for i in batch])).mel_ce.item())
        timed.drop_duration_in_eval = False
    mel_tokens = sum(len(e.codes) + 1 for e in examples)
    assert abs(sum(manual) / mel_tokens - first["val_mel_loss"]) < 1e-6
