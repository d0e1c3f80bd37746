"""Greedy decoding with a KV cache equals recomputing the whole sequence, and stops on the stop code."""

from __future__ import annotations

import torch

from trainer.config import gpt_config_from_dict
from trainer.generate import greedy_codes
from trainer.model import UnifiedVoiceGPT
from trainer.synthetic import tiny_config_dict


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = gpt_config_from_dict(tiny_config_dict(60, dim=32, layers=2)["gpt"])
    return UnifiedVoiceGPT(cfg, base_rows=20).eval()


def test_cached_decoding_equals_full_recompute():
    model = tiny_model()
    with torch.no_grad():
        model.mel_head.bias[model.cfg.stop_mel_token] = -1e4  # no early stop: compare a long sequence
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(2, 60, (7,), generator=gen)
    cond, emo = torch.randn(32, 32, generator=gen), torch.randn(32, generator=gen)
    cached = greedy_codes(model, text, cond, emo, max_codes=40)
    full = greedy_codes(model, text, cond, emo, max_codes=40, use_cache=False)
    assert cached.codes == full.codes and len(cached.codes) == 40 and not cached.stopped
    assert len(set(cached.codes)) > 1


def test_decoding_stops_on_the_stop_code_and_matches_the_training_forward():
    from trainer.model import Batch

    model = tiny_model(3)
    gen = torch.Generator().manual_seed(2)
    text = torch.randint(2, 60, (5,), generator=gen)
    cond, emo = torch.randn(32, 32, generator=gen), torch.randn(32, generator=gen)
    out = greedy_codes(model, text, cond, emo, max_codes=12)
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
