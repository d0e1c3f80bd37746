"""Vocabulary surgery: grow text rows from B+1 (base) to N+1 (extended) and initialise the new rows.

Row B is the base model's never-used extra row; the first new token inherits it, so it is re-initialised
like every other new row (docs/design.md §0). Methods:
- `mean`: embedding mean of the base rows plus noise scaled to their per-dimension std; head weight and bias
  set to the base mean.
- `subtoken`: a new piece whose transliteration (trainer/model/translit.py) the base tokenizer spells with base
  pieces starts from the mean of those base rows (embedding, head weight and head bias alike); the others
  get `mean`.
- `random`: the community trainers' behaviour: normal(0, 0.02) embedding, PyTorch's default Linear init for
  the head. The baseline to beat.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model import translit
from fidel_tts.trainer.model.config import GPTConfig
from fidel_tts.trainer.model.gpt import SPLIT_KEYS, UnifiedVoiceGPT, load_upstream_state_dict
from fidel_tts.trainer.model.weights import BaseCheckpoint, tensor_sha256
from fidel_tts.trainer.text.tokenizer import load_tokenizer
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as model_pb2

INIT_METHODS = ("subtoken", "mean", "random")  # how new rows start: the --init option's choices


@dataclass
class InitRecord:
    method: str
    seed: int
    base_rows: int
    total_rows: int
    sha256: str  # of the initial new rows, so "new rows moved from init" can be checked later
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NewRows:
    embedding: torch.Tensor  # [N+1-B, D]
    head_weight: torch.Tensor  # [N+1-B, D]
    head_bias: torch.Tensor  # [N+1-B]
    detail: dict = field(default_factory=dict)


def random_rows(new_rows: int, dim: int, gen: torch.Generator) -> NewRows:
    bound = 1 / math.sqrt(dim)
    emb = torch.randn(new_rows, dim, generator=gen) * 0.02
    head_w = (torch.rand(new_rows, dim, generator=gen) * 2 - 1) * bound
    head_b = (torch.rand(new_rows, generator=gen) * 2 - 1) * bound
    return NewRows(emb, head_w, head_b)


def mean_rows(base_emb, base_head_w, base_head_b, new_rows: int, gen: torch.Generator) -> NewRows:
    dim = base_emb.shape[1]
    base_emb = base_emb.float()
    emb = base_emb.mean(0) + torch.randn(new_rows, dim, generator=gen) * base_emb.std(0)
    head_w = base_head_w.float().mean(0).expand(new_rows, dim).clone()
    head_b = base_head_b.float().mean().expand(new_rows).clone()
    return NewRows(emb, head_w, head_b)


def base_processor(tokenizer: SentencePieceProcessor, base_rows: int,
                   word_start: bool = True) -> SentencePieceProcessor:
    """The base tokenizer inside an extended one: extension only appends, so its first B pieces are the base.

    word_start=False spells word-internal text: no "▁" is put in front of it."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.serialized_model_proto())
    del proto.pieces[base_rows:]
    proto.normalizer_spec.add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix and word_start
    sp = SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


@dataclass
class BaseSpeller:
    """Encodes a Latin reading with base pieces: a word-start piece as a word, an inner piece as a word's middle."""

    word_start: SentencePieceProcessor
    inner: SentencePieceProcessor

    @classmethod
    def of(cls, tokenizer: SentencePieceProcessor, base_rows: int) -> BaseSpeller:
        return cls(base_processor(tokenizer, base_rows), base_processor(tokenizer, base_rows, word_start=False))


def subtoken_ids(piece: str, speller: BaseSpeller) -> list[int] | None:
    """Base ids that spell the piece's transliteration, or None when the piece has no Ethiopic reading."""
    if not any(translit.is_ethiopic(ch) for ch in piece):
        return None
    latin = translit.transliterate(piece)
    if latin is None:
        return None
    sp = speller.word_start if latin.startswith(translit.WORD_START) else speller.inner
    text = latin.replace(translit.WORD_START, " ").strip()
    ids = sp.encode(text, out_type=int) if text else []
    if not ids or sp.unk_id() in ids:
        return None
    return ids


def subtoken_rows(base_emb, base_head_w, base_head_b, tokenizer: SentencePieceProcessor, base_rows: int,
                  new_rows: int, gen: torch.Generator) -> NewRows:
    rows = mean_rows(base_emb, base_head_w, base_head_b, new_rows, gen)
    speller = BaseSpeller.of(tokenizer, base_rows)
    mapped = 0
    for offset in range(new_rows):
        token = base_rows + offset
        if token >= tokenizer.get_piece_size():
            break  # row N: no piece ever maps to it
        ids = subtoken_ids(tokenizer.id_to_piece(token), speller)
        if ids is None:
            continue
        index = torch.tensor(ids)
        rows.embedding[offset] = base_emb[index].float().mean(0)
        rows.head_weight[offset] = base_head_w[index].float().mean(0)
        rows.head_bias[offset] = base_head_b[index].float().mean()
        mapped += 1
    rows.detail = {"mapped_rows": mapped, "mean_rows": new_rows - mapped,
                   "translit_table_sha256": translit.table_sha256()}
    return rows


def new_rows_init(base_emb, base_head_w, base_head_b, new_rows: int, method: str, seed: int,
                  tokenizer: SentencePieceProcessor | None = None) -> NewRows:
    """Initial embedding, head weight and head bias for rows B..N."""
    gen = torch.Generator().manual_seed(seed)
    dim = base_emb.shape[1]
    if method not in INIT_METHODS:
        raise FidelError(None, f"unknown init method {method!r}; choose from {', '.join(INIT_METHODS)}")
    if method == "random" or base_emb.shape[0] == 0:
        return random_rows(new_rows, dim, gen)
    if method == "mean":
        return mean_rows(base_emb, base_head_w, base_head_b, new_rows, gen)
    if tokenizer is None:
        raise FidelError(None, "--init subtoken needs the extended tokenizer")
    return subtoken_rows(base_emb, base_head_w, base_head_b, tokenizer, base_emb.shape[0], new_rows, gen)


def extended_model(base: BaseCheckpoint, cfg: GPTConfig, base_rows: int, method: str = "mean", seed: int = 0,
                   tokenizer: SentencePieceProcessor | str | Path | None = None, freeze: str = "split",
                   duration_control: bool = False) -> tuple[UnifiedVoiceGPT, InitRecord]:
    """A model with the base weights, base rows frozen, and cfg.text_rows - base_rows new rows initialised.

    Built on the meta device and then filled: every tensor comes from the base or the init, so the model's
    own random init would be wasted time at full size (and would draw from the global RNG).
    """
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    with torch.device("meta"):
        model = UnifiedVoiceGPT(cfg, base_rows, freeze=freeze, duration_control=duration_control)
    model = model.to_empty(device="cpu")
    t = base.training
    emb, head_w, head_b = (t[k][:base_rows] for k in SPLIT_KEYS)
    rows = new_rows_init(emb, head_w, head_b, cfg.text_rows - base_rows, method, seed, tokenizer)
    state = dict(t)
    state["text_embedding.weight"] = torch.cat([emb, rows.embedding.to(emb.dtype)])
    state["text_head.weight"] = torch.cat([head_w, rows.head_weight.to(head_w.dtype)])
    state["text_head.bias"] = torch.cat([head_b, rows.head_bias.to(head_b.dtype)])
    load_upstream_state_dict(model, state)
    record = InitRecord(method, seed, base_rows, cfg.text_rows,
                        tensor_sha256(rows.embedding, rows.head_weight, rows.head_bias), rows.detail)
    return model, record
