"""Greedy decoding of semantic codes with a KV cache, on the training-path model (no HF generate).

The prompt is laid out as `UnifiedVoiceGPT.forward` lays out a batch: the conditioning prefix (condition +
emotion vector, the duration slot, the free-duration slot), start/text/stop with text positions, then the
start-mel token at mel position 0. Each new code attends to the cached keys and values of everything before it.

Two decodes, which differ in where generated codes sit (DECODES):
- "indextts2", the default: as IndexTTS2's released inference runs the exported model. Its KV-cache path
  (`GPT2InferenceModel.forward`, index-tts with its pinned transformers 4.x) embeds the k-th generated code at
  mel position k+1, from `get_fixed_embedding(attention_mask.shape[1] - mel_len)`, and always puts speed_emb(1)
  in the duration slot (`inference_speech` takes no target length).
- "training": code k at mel position k, as training and upstream's no-cache path lay it out. The PyPI port
  `indextts2-inference` 2.1.1 places codes this way too: under transformers 5 its generate never hands the cache
  to the model, so every step recomputes the whole sequence. With duration control the duration slot holds
  speed_emb(0) here (upstream's speed_emb(1) otherwise), the "no length given" embedding the duration dropout
  trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from fidel_tts.trainer.model.gpt import Block, UnifiedVoiceGPT
from fidel_tts.trainer.training.build import build_model, load_trainable
from fidel_tts.trainer.training.checkpoint import load_checkpoint

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
DECODES = {
    "indextts2": "as IndexTTS2 inference (KV cache: code k at mel position k+1, duration slot speed_emb(1))",
    "training": "as training (code k at mel position k)",
}
DEFAULT_DECODE = "indextts2"


@dataclass
class Generated:
    codes: list[int]  # without the stop code
    stopped: bool  # the stop code was emitted within max_codes


def block_step(block: Block, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None):
    """One block on new positions x [1, t, D], given the cached keys/values of the earlier ones."""
    b, t, d = x.shape
    heads = block.attn.heads
    q, k, v = block.attn.c_attn(block.ln_1(x)).split(d, dim=2)
    q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    if past is None or t == 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
    else:  # several new positions after a cache: causal over the new ones, all of the past visible
        offset = k.shape[2] - t
        mask = torch.arange(k.shape[2], device=x.device)[None, :] <= (offset + torch.arange(t, device=x.device))[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x + block.attn.c_proj(y.transpose(1, 2).reshape(b, t, d))
    return x + block.mlp(block.ln_2(x)), (k, v)


def backbone_step(model: UnifiedVoiceGPT, x: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
    new_cache = []
    for i, block in enumerate(model.gpt.h):
        x, kv = block_step(block, x, cache[i] if cache else None)
        new_cache.append(kv)
    return model.gpt.ln_f(x), new_cache


def check_decode(decode: str) -> None:
    if decode not in DECODES:
        raise ValueError(f"decode {decode!r}: choose from {', '.join(DECODES)}")


def code_position(count: int, decode: str) -> int:
    """The mel position the count-th generated code (1-based) is embedded at."""
    return count + 1 if decode == "indextts2" else count


def prompt_embeddings(model: UnifiedVoiceGPT, text_ids: torch.Tensor, condition: torch.Tensor,
                      emo_vec: torch.Tensor, decode: str = DEFAULT_DECODE) -> torch.Tensor:
    """[1, prefix + T + 2 + 1, D]: prefix, start + text + stop, start-mel at mel position 0."""
    cfg = model.cfg
    speed = model.speed_emb.weight
    duration = speed[0] if model.duration_control and decode == "training" else speed[1]
    prefix = torch.cat([(condition + emo_vec[None, :]), duration[None], speed[0][None]], dim=0)
    text = torch.cat([torch.tensor([cfg.start_text_token]), text_ids.long().cpu(), torch.tensor([cfg.stop_text_token])])
    text = text.to(prefix.device)
    text_emb = model.text_embedding(text) + model.text_pos_embedding(len(text))
    start = torch.tensor([cfg.start_mel_token], device=prefix.device)
    mel_emb = model.mel_embedding(start) + model.mel_pos_embedding(1)
    return torch.cat([prefix.to(text_emb.dtype), text_emb, mel_emb])[None]


@torch.no_grad()
def greedy_codes(model: UnifiedVoiceGPT, text_ids: torch.Tensor, condition: torch.Tensor, emo_vec: torch.Tensor,
                 max_codes: int, use_cache: bool = True, decode: str = DEFAULT_DECODE) -> Generated:
    """Greedy codes until the stop code or max_codes, laid out as `decode` says (DECODES). use_cache=False
    recomputes the whole sequence each step (the reference the cached path is tested against)."""
    check_decode(decode)
    was_training = model.training
    model.eval()
    try:
        cfg = model.cfg
        max_codes = min(max_codes, cfg.mel_positions - 1 - code_position(1, decode))
        x = prompt_embeddings(model, text_ids, condition, emo_vec, decode)
        hidden, cache = backbone_step(model, x, None)
        codes: list[int] = []
        while True:
            logits = model.mel_head(model.final_norm(hidden[:, -1]))
            code = int(logits.argmax(-1))
            if code == cfg.stop_mel_token:
                return Generated(codes, True)
            codes.append(code)
            if len(codes) >= max_codes:
                return Generated(codes, False)
            position = code_position(len(codes), decode)
            step = model.mel_embedding.weight[code] + model.mel_pos_embedding.emb.weight[position]
            if use_cache:
                hidden, cache = backbone_step(model, step[None, None], cache)
            else:
                x = torch.cat([x, step[None, None]], dim=1)
                hidden, _ = backbone_step(model, x, None)
    finally:
        model.train(was_training)


def trained_model(tc, checkpoint: str | Path) -> UnifiedVoiceGPT:
    """The run's model (built from its base) with a fidel checkpoint's trainable state loaded."""
    model = build_model(tc).model
    state, _ = load_checkpoint(Path(checkpoint))
    return load_trainable(model, state["model"]).eval()


def decode_validation(model: UnifiedVoiceGPT, val_set, n: int, max_ratio: float = 5.0,
                      decode: str = DEFAULT_DECODE) -> list[tuple[Generated, int]]:
    """Greedy codes for the first n validation texts, each with its reference code length."""
    out = []
    for i in range(min(n, len(val_set))):
        example = val_set[i]
        reference = len(example.codes)
        generated = greedy_codes(model, example.text_ids, example.condition, example.emo_vec,
                                 max_codes=max(1, int(max_ratio * reference)) + 1, decode=decode)
        out.append((generated, reference))
    return out
