"""Greedy decoding with a KV cache equals recomputing the whole sequence, and stops on the stop code; the
"training" decode matches the training forward, the default "indextts2" decode lays codes out as IndexTTS2's
inference does (tests/unit/test_upstream.py runs upstream itself)."""

from __future__ import annotations

import pytest
import torch
from fidel_tts.trainer.evaluation.generate import greedy_codes, prompt_embeddings
from fidel_tts.trainer.model.config import gpt_config_from_dict
from fidel_tts.trainer.model.gpt import UnifiedVoiceGPT

from tests.fixtures.synthetic import tiny_config_dict


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = gpt_config_from_dict(tiny_config_dict(60, dim=32, layers=2)["gpt"])
    return UnifiedVoiceGPT(cfg, base_rows=20).eval()


@pytest.mark.parametrize("decode", ["indextts2", "training"])
def test_cached_decoding_equals_full_recompute(decode):
    model = tiny_model()
    with torch.no_grad():
        model.mel_head.bias[model.cfg.stop_mel_token] = -1e4  # no early stop: compare a long sequence
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(2, 60, (7,), generator=gen)
    cond, emo = torch.randn(32, 32, generator=gen), torch.randn(32, generator=gen)
    cached = greedy_codes(model, text, cond, emo, max_codes=40, decode=decode)
    full = greedy_codes(model, text, cond, emo, max_codes=40, use_cache=False, decode=decode)
    assert cached.codes == full.codes and len(cached.codes) == 40 and not cached.stopped
    assert len(set(cached.codes)) > 1


def test_the_two_decodes_differ_only_in_the_positions_of_generated_codes():
    model = tiny_model(5)
    with torch.no_grad():
        model.mel_head.bias[model.cfg.stop_mel_token] = -1e4
        model.mel_pos_embedding.emb.weight.mul_(50)  # make positions decide the codes
    gen = torch.Generator().manual_seed(4)
    text = torch.randint(2, 60, (6,), generator=gen)
    cond, emo = torch.randn(32, 32, generator=gen), torch.randn(32, generator=gen)
    indextts2 = greedy_codes(model, text, cond, emo, max_codes=30)
    training = greedy_codes(model, text, cond, emo, max_codes=30, decode="training")
    assert indextts2.codes != training.codes
    with torch.no_grad():  # shift positions 2.. down by one: the training decode then sees what indextts2 sees
        rows = model.mel_pos_embedding.emb.weight
        rows[1:-1] = rows[2:].clone()
    assert greedy_codes(model, text, cond, emo, max_codes=30, decode="training").codes == indextts2.codes


def test_the_duration_slot_is_speed_emb_1_as_upstream_inference_sends_it():
    cfg = gpt_config_from_dict(tiny_config_dict(60, dim=32, layers=2)["gpt"])
    model = UnifiedVoiceGPT(cfg, base_rows=20, duration_control=True).eval()
    text, cond, emo = torch.tensor([5, 6]), torch.zeros(32, 32), torch.zeros(32)
    speed = model.speed_emb.weight
    slot = cfg.prefix_len - 2
    with torch.no_grad():
        assert torch.equal(prompt_embeddings(model, text, cond, emo)[0, slot], speed[1])
        assert torch.equal(prompt_embeddings(model, text, cond, emo, "training")[0, slot], speed[0])
    with pytest.raises(ValueError, match="decode 'hf'"):
        greedy_codes(model, text, cond, emo, max_codes=3, decode="hf")


def test_decoding_stops_on_the_stop_code_and_matches_the_training_forward():
    from fidel_tts.trainer.model.gpt import Batch

    model = tiny_model(3)
    gen = torch.Generator().manual_seed(2)
    text = torch.randint(2, 60, (5,), generator=gen)
    cond, emo = torch.randn(32, 32, generator=gen), torch.randn(32, generator=gen)
    out = greedy_codes(model, text, cond, emo, max_codes=12, decode="training")
    # the training forward, teacher-forced on the decoded codes, predicts the same greedy codes
    codes = torch.tensor(out.codes)[None]
    batch = Batch(text[None], torch.tensor([5]), codes, torch.tensor([len(out.codes)]), cond[None], emo[None])
    model.speed_emb.weight.data[1] = model.speed_emb.weight.data[1]  # duration slot: speed_emb(1) in both paths
    with torch.no_grad():
        _, _, mel_logits, _ = model(batch)
    assert mel_logits[0, : len(out.codes)].argmax(-1).tolist() == out.codes
    with torch.no_grad():
        model.mel_head.bias[model.cfg.stop_mel_token] = 1e4
    stopped = greedy_codes(model, text, cond, emo, max_codes=12)
    assert stopped.stopped and stopped.codes == []


def test_the_smoke_gate_names_the_decode_it_judged():
    from fidel_tts.trainer.evaluation.gates import inference_smoke
    from fidel_tts.trainer.evaluation.generate import DECODES, DEFAULT_DECODE

    assert DEFAULT_DECODE == "indextts2" and set(DECODES) == {"indextts2", "training"}
    gate = inference_smoke([(50, True, 48)], decode=DEFAULT_DECODE)
    assert gate.passed and gate.value.endswith("decode indextts2") and "decode indextts2" in gate.line()
    assert "decode training" in inference_smoke([], decode="training").value
