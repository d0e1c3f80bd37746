import pytest
import torch
import torch.nn.functional as F
from fidel_tts.trainer.model.config import GPTConfig
from fidel_tts.trainer.model.gpt import (
    Batch,
    UnifiedVoiceGPT,
    aligned_inputs_and_targets,
    upstream_state_dict,
    valid_mask,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
INDUCTOR_IMPORT_WARNING = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
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


def full_logit_loss_sums(model, batch):
    """The loss as it was before chunking: logits at every position, masked afterwards."""
    text_logits, text_tgt, mel_logits, mel_tgt = model(batch)
    text_mask = valid_mask(text_tgt.shape[1], batch.text_lengths)
    mel_mask = valid_mask(mel_tgt.shape[1], batch.code_lengths)
    text_ce = F.cross_entropy(text_logits[text_mask].float(), text_tgt[text_mask], reduction="sum")
    mel_logits = mel_logits[mel_mask].float()
    mel_ce = F.cross_entropy(mel_logits, mel_tgt[mel_mask], reduction="sum")
    return text_ce, mel_ce, (mel_logits.argmax(-1) == mel_tgt[mel_mask]).sum()


def loss_and_grads(model, batch, loss_fn, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout on: the same masks in both
    text_ce, mel_ce, correct = loss_fn(model, batch)
    (0.2 * text_ce + 0.8 * mel_ce).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (text_ce.detach(), mel_ce.detach(), correct), grads


def tolerance(device: str) -> dict:
    return {} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-5}


def chunked_sums(model, batch):
    sums = model.loss_sums(batch)
    return sums.text_ce, sums.mel_ce, sums.mel_correct


@pytest.mark.parametrize("freeze", ["split", "hooks"])
@pytest.mark.parametrize("chunk_rows", [4096, 7])
@pytest.mark.parametrize("host_counts", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_loss_over_scored_rows_equals_full_logit_loss(freeze, chunk_rows, host_counts, device):
    torch.manual_seed(0)
    model = UnifiedVoiceGPT(CFG, base_rows=40, freeze=freeze).to(device).train()
    model.ce_chunk_rows = chunk_rows  # 7: several chunks, the last one short
    batch = random_batch().to(device) if host_counts else Batch(*(t.to(device) for t in random_batch().tensors()))
    assert (batch.scored is not None) == host_counts
    (text_a, mel_a, correct_a), grads_a = loss_and_grads(model, batch, full_logit_loss_sums)
    (text_b, mel_b, correct_b), grads_b = loss_and_grads(model, batch, chunked_sums)
    torch.testing.assert_close(text_b, text_a)
    torch.testing.assert_close(mel_b, mel_a)
    assert correct_a == correct_b
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(model.parameters()))
    for name in grads_a:  # on CUDA, attention's backward may add in another order from run to run
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name, **tolerance(device))
    if freeze == "hooks":
        for name in ("text_embedding.weight", "text_head.weight", "text_head.bias"):
            assert grads_b[name][:40].abs().max() == 0 and grads_b[name][40:].abs().max() > 0, name
    else:
        assert all(t.grad is None for t in model.base_row_tensors())


def test_scored_counts_come_from_the_host_and_match_the_mask():
    batch = random_batch()
    assert batch.scored is None and batch.scored_counts() == (5 + 9 + 7 + 3, 20 + 12 + 31 + 3)
    moved = batch.to("cpu")
    assert moved.scored == batch.scored_counts() and torch.equal(moved.codes, batch.codes)


@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing_gives_the_same_losses_and_gradients_with_dropout(device):
    torch.manual_seed(0)
    plain = UnifiedVoiceGPT(CFG, base_rows=40).to(device).train()
    checkpointed = UnifiedVoiceGPT(CFG, base_rows=40, activation_checkpointing=True).to(device).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert all(block.checkpointing for block in checkpointed.gpt.h)
    batch = random_batch().to(device)
    (text_a, mel_a, _), grads_a = loss_and_grads(plain, batch, chunked_sums, seed=5)
    (text_b, mel_b, _), grads_b = loss_and_grads(checkpointed, batch, chunked_sums, seed=5)
    assert torch.equal(text_a, text_b) and torch.equal(mel_a, mel_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name, **tolerance(device))
    (_, _, _), grads_other_seed = loss_and_grads(plain, batch, chunked_sums, seed=6)
    assert not torch.equal(grads_other_seed["gpt.h.0.mlp.c_fc.weight"], grads_a["gpt.h.0.mlp.c_fc.weight"])


def test_activation_checkpointing_keeps_fewer_tensors_for_backward():
    def saved_by(model) -> int:
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.loss_sums(random_batch())
        return count[0]

    model = UnifiedVoiceGPT(CFG, base_rows=40).train()
    plain = saved_by(model)
    model.set_activation_checkpointing(True)
    assert saved_by(model) < plain


@pytest.mark.filterwarnings(INDUCTOR_IMPORT_WARNING)
def test_compiling_the_blocks_keeps_state_dict_and_parameter_names():
    model = UnifiedVoiceGPT(CFG, base_rows=40)
    keys, names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    model.compile_blocks()
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    assert not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize("chunk_rows,keeps_logits", [(4096, True), (7, False)])
def test_several_loss_chunks_keep_no_logits_for_backward(chunk_rows, keeps_logits):
    """Logits are [rows, 61] (text) or [rows, 34] (mel); a lone chunk keeps its own (they are the peak anyway)."""
    model = UnifiedVoiceGPT(CFG, base_rows=40).train()
    model.ce_chunk_rows = chunk_rows
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss_sums(random_batch())
    assert any(len(s) == 2 and s[1] in (61, 34) for s in shapes) == keeps_logits
