"""New-row initialisation: mean, subtoken (through the Ethiopic→Latin table) and random; row B re-initialised;
method, seed and hash recorded in the checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model.config import GPTConfig
from fidel_tts.trainer.model.gpt import SPLIT_KEYS, UnifiedVoiceGPT, upstream_state_dict
from fidel_tts.trainer.model.translit import syllable, table_sha256, transliterate
from fidel_tts.trainer.model.vocab import (
    BaseSpeller,
    base_processor,
    extended_model,
    new_rows_init,
    subtoken_ids,
)
from fidel_tts.trainer.model.weights import BaseCheckpoint
from fidel_tts.trainer.text.tokenizer import load_tokenizer


@pytest.mark.parametrize("word, latin", [
    ("ሰላም", "SELAM"), ("ኢትዮጵያ", "ITYOPYA"), ("አማርኛ", "AMARNYA"), ("ቋንቋ", "QWANQWA"), ("ሀገር", "HAGER"),
    ("ፀሐይ", "TSEHAY"), ("ዓለም", "ALEM"), ("▁ቤት", "▁BET"), ("ጨረቃ", "CHEREQA"), ("ሏ", "LWA"),
])
def test_transliteration_table(word, latin):
    assert transliterate(word) == latin


def test_transliteration_gaps_are_none_not_guesses():
    assert syllable("ቑ") is None  # a reserved slot of the labialised ቈ series
    assert syllable("ቐ") is None  # Tigrinya series, not in the Amharic table
    assert transliterate("ሰቐ") is None
    assert transliterate("ABC.") == "ABC."
    assert len(table_sha256()) == 64


def tiny_base(tokens: int, dim: int = 16, seed: int = 0) -> BaseCheckpoint:
    cfg = GPTConfig(model_dim=dim, layers=1, heads=2, max_text_tokens=40, max_mel_tokens=80,
                    number_text_tokens=tokens, number_mel_codes=34, start_mel_token=32, stop_mel_token=33)
    torch.manual_seed(seed)
    state = upstream_state_dict(UnifiedVoiceGPT(cfg, base_rows=0))
    with torch.no_grad():  # a base whose rows are not centred on zero, so `mean` is distinguishable from `random`
        state["text_embedding.weight"].add_(torch.linspace(-1, 1, dim)).mul_(3)
        state["text_head.bias"].add_(2.0)
    return BaseCheckpoint(Path("tiny-base"), state, {}, list(state))


def grown(base: BaseCheckpoint, tokens: int) -> GPTConfig:
    emb = base.training["text_embedding.weight"]
    return GPTConfig(model_dim=emb.shape[1], layers=1, heads=2, max_text_tokens=40, max_mel_tokens=80,
                     number_text_tokens=tokens, number_mel_codes=34, start_mel_token=32, stop_mel_token=33)


@pytest.mark.parametrize("method", ["mean", "random", "subtoken"])
def test_base_rows_kept_and_row_b_reinitialised(method, tiny_project):
    sp = load_tokenizer(tiny_project.tokenizer)
    b = load_tokenizer(tiny_project.base_tokenizer).get_piece_size()
    base = tiny_base(b)
    model, record = extended_model(base, grown(base, sp.get_piece_size()), b, method, seed=1, tokenizer=sp)
    state = upstream_state_dict(model)
    for key in SPLIT_KEYS:
        assert torch.equal(state[key][:b], base.training[key][:b])
        assert not torch.equal(state[key][b], base.training[key][b])  # the base's extra row is not inherited
    assert (record.method, record.seed, record.base_rows, record.total_rows) == (method, 1, b, sp.get_piece_size() + 1)


def test_mean_init_matches_base_statistics():
    base = tiny_base(400, dim=16)
    emb, head_w, head_b = (base.training[k][:400] for k in SPLIT_KEYS)
    rows = new_rows_init(emb, head_w, head_b, 4000, "mean", seed=0)
    torch.testing.assert_close(rows.embedding.mean(0), emb.mean(0), atol=0.15, rtol=0)
    torch.testing.assert_close(rows.embedding.std(0), emb.std(0), atol=0.15, rtol=0.05)
    assert torch.equal(rows.head_weight, head_w.mean(0).expand(4000, -1))
    assert torch.equal(rows.head_bias, head_b.mean().expand(4000))


def test_random_init_is_the_community_trainers():
    base = tiny_base(400, dim=16)
    emb, head_w, head_b = (base.training[k][:400] for k in SPLIT_KEYS)
    rows = new_rows_init(emb, head_w, head_b, 4000, "random", seed=0)
    assert abs(float(rows.embedding.std()) - 0.02) < 0.002 and abs(float(rows.embedding.mean())) < 0.002
    bound = 1 / 16**0.5
    assert rows.head_weight.abs().max() <= bound and rows.head_weight.abs().max() > 0.9 * bound
    assert rows.head_bias.abs().max() <= bound


def test_same_seed_same_rows_other_seed_other_rows():
    base = tiny_base(100)
    args = [base.training[k][:100] for k in SPLIT_KEYS]
    for method in ("mean", "random"):
        a, b, c = (new_rows_init(*args, 50, method, seed=s) for s in (3, 3, 4))
        assert torch.equal(a.embedding, b.embedding) and not torch.equal(a.embedding, c.embedding)


def test_subtoken_rows_are_means_of_the_transliterated_base_pieces(tiny_project):
    sp = load_tokenizer(tiny_project.tokenizer)
    b = load_tokenizer(tiny_project.base_tokenizer).get_piece_size()
    base = tiny_base(b)
    emb, head_w, head_b = (base.training[k][:b] for k in SPLIT_KEYS)
    new = sp.get_piece_size() + 1 - b
    rows = new_rows_init(emb, head_w, head_b, new, "subtoken", seed=0, tokenizer=sp)
    base_sp = base_processor(sp, b)
    assert base_sp.get_piece_size() == b
    assert all(base_sp.id_to_piece(i) == sp.id_to_piece(i) for i in range(b))
    speller = BaseSpeller.of(sp, b)
    mapped = 0
    for offset in range(new - 1):
        ids = subtoken_ids(sp.id_to_piece(b + offset), speller)
        if ids is None:
            continue
        mapped += 1
        assert all(i < b for i in ids)
        torch.testing.assert_close(rows.embedding[offset], emb[ids].mean(0))
        torch.testing.assert_close(rows.head_weight[offset], head_w[ids].mean(0))
        torch.testing.assert_close(rows.head_bias[offset], head_b[ids].mean())
    # every Ethiopic letter is a piece now, and the transliteration table spells the common ones: over half map
    assert mapped == rows.detail["mapped_rows"] and mapped > 0.5 * (new - 1)
    assert rows.detail["translit_table_sha256"] == table_sha256()
    word = "".join(base_sp.id_to_piece(i) for i in subtoken_ids("▁ሰላም", speller))
    inner = "".join(base_sp.id_to_piece(i) for i in subtoken_ids("ላም", speller))
    assert word == "▁SELAM" and inner == "LAM"  # a word-internal piece is spelled without a word boundary
    assert subtoken_ids("▁[AM]", speller) is None  # no Ethiopic: mean init instead


def test_subtoken_needs_the_tokenizer_and_unknown_methods_are_refused():
    base = tiny_base(20)
    args = [base.training[k][:20] for k in SPLIT_KEYS]
    with pytest.raises(FidelError, match="needs the extended tokenizer"):
        new_rows_init(*args, 5, "subtoken", seed=0)
    with pytest.raises(FidelError, match="unknown init method"):
        new_rows_init(*args, 5, "zeros", seed=0)


def test_init_record_is_in_the_checkpoint(tiny_project, make_train_config, tmp_path):
    from fidel_tts.trainer.training.checkpoint import list_checkpoints, load_checkpoint
    from fidel_tts.trainer.training.trainer import train

    result = train(make_train_config(tiny_project, tmp_path / "out", max_steps=2, save_interval=2, val_interval=2,
                                     init="subtoken", seed=7))
    assert result.status == "completed", result.reason
    path = list_checkpoints(tmp_path / "out")[0]
    state, meta = load_checkpoint(path)
    init = state["lineage"]["init"]
    assert (init["method"], init["seed"]) == ("subtoken", 7) and len(init["sha256"]) == 64
    assert init["detail"]["mapped_rows"] > 0
    assert meta["init"] == init and json.loads(path.with_suffix(".json").read_text())["freeze"] == "split"
