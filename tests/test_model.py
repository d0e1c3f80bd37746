import torch

from trainer.config import GPTConfig
from trainer.model import Batch, UnifiedVoiceGPT, aligned_inputs_and_targets, upstream_state_dict, valid_mask

CFG = GPTConfig(model_dim=32, layers=2, heads=2, max_text_tokens=40, max_mel_tokens=80, number_text_tokens=60,
                number_mel_codes=34, start_mel_token=32, stop_mel_token=33)


def random_batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_len = torch.tensor([5, 9, 7][:n])
    code_len = torch.tensor([20, 12, 31][:n])
    return Batch(torch.randint(3, 60, (n, 9), generator=g), text_len, torch.randint(0, 32, (n, 31), generator=g),
                 code_len, torch.randn(n, 32, 32, generator=g), torch.randn(n, 32, generator=g))


def test_aligned_layout_matches_reference():
    ids = torch.tensor([[7, 8, 9, 0], [5, 0, 0, 0]])
    inputs, targets = aligned_inputs_and_targets(ids, torch.tensor([3, 1]), start=0, stop=1)
    assert inputs.tolist() == [[0, 7, 8, 9, 1, 1], [0, 5, 1, 1, 1, 1]]
    assert targets.tolist() == [[7, 8, 9, 1, 1, 1], [5, 1, 1, 1, 1, 1]]
    assert valid_mask(6, torch.tensor([3, 1])).tolist() == [[True] * 4 + [False] * 2, [True] * 2 + [False] * 4]


def test_forward_shapes_and_masked_loss_counts():
    model = UnifiedVoiceGPT(CFG, base_rows=40)
    batch = random_batch()
    text_logits, text_tgt, mel_logits, mel_tgt = model(batch)
    assert text_logits.shape == (3, 9 + 2, 61) and mel_logits.shape == (3, 31 + 2, 34)
    sums = model.loss_sums(batch)
    assert sums.text_tokens.item() == (5 + 1) + (9 + 1) + (7 + 1)
    assert sums.mel_tokens.item() == (20 + 1) + (12 + 1) + (31 + 1)
    text_loss, mel_loss = sums.losses()
    assert 0 < text_loss.item() < 10 and 0 < mel_loss.item() < 10


def test_base_rows_are_buffers_and_get_no_gradient():
    model = UnifiedVoiceGPT(CFG, base_rows=40)
    names = {n for n, _ in model.named_parameters()}
    assert "text_embedding.new" in names and "text_embedding.base" not in names
    assert model.text_embedding.new.shape == (61 - 40, 32)
    text_loss, mel_loss = model.loss_sums(random_batch()).losses()
    (text_loss + mel_loss).backward()
    assert model.text_embedding.base.grad is None and model.text_head.base_weight.grad is None
    assert model.text_head.new_weight.grad.abs().sum() > 0


def test_padding_does_not_change_an_items_scored_targets_count():
    model = UnifiedVoiceGPT(CFG, base_rows=0).eval()
    batch = random_batch(n=2)
    wider = Batch(torch.nn.functional.pad(batch.text_ids, (0, 5)), batch.text_lengths,
                  torch.nn.functional.pad(batch.codes, (0, 7)), batch.code_lengths, batch.condition, batch.emo_vec)
    assert model.loss_sums(batch).mel_tokens == model.loss_sums(wider).mel_tokens


def test_upstream_state_dict_has_merged_text_rows():
    model = UnifiedVoiceGPT(CFG, base_rows=40)
    state = upstream_state_dict(model)
    assert state["text_embedding.weight"].shape == (61, 32)
    assert state["text_head.bias"].shape == (61,)
    assert not any("new" in k or "base" in k for k in state)
