"""The UnifiedVoice training path, with upstream's parameter names, and base text rows that are not parameters.

Upstream builds the backbone from `transformers.GPT2Model`; here it is written directly with
`F.scaled_dot_product_attention` (causal, no materialised mask). Weight layouts match HF's GPT-2
(Conv1D weights are [in, out]) so a real `gpt.pth` loads with no renaming.

Freezing (docs/design.md §1): `text_embedding` and `text_head` each hold the base rows 0..B-1 as buffers and
rows B..N as parameters. The optimizer, weight decay, clipping, GradScaler and DDP never see base rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from fidel_tts.trainer.model.config import GPTConfig
from torch.utils.checkpoint import checkpoint

DROPOUT = 0.1  # GPT2Config as upstream builds it: resid, embd and attn dropout all 0.1
LAYER_NORM_EPS = 1e-5
CE_CHUNK_ROWS = 4096  # logit rows per cross-entropy chunk: 4096 × 24001 fp32 logits are 393 MB


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: weight stored [in, out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=DROPOUT if self.training else 0.0)
        return F.dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, d)), DROPOUT, self.training)


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = Conv1D(dim, 4 * dim)
        self.c_proj = Conv1D(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")), DROPOUT, self.training)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(dim)
        self.checkpointing = False  # recompute the block in backward instead of keeping its activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # non-reentrant checkpointing restores the RNG state, so the recompute replays the same dropout
            return checkpoint(self.attend_and_mix, x, use_reentrant=False)
        return self.attend_and_mix(x)

    def attend_and_mix(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Backbone(nn.Module):
    """GPT2Model minus wte/wpe (upstream deletes wte and zeroes wpe): embedding dropout, blocks, ln_f."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.h = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, DROPOUT, self.training)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class LearnedPositions(nn.Module):
    def __init__(self, positions: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(positions, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, length: int) -> torch.Tensor:
        return self.emb.weight[:length]


class SplitEmbedding(nn.Module):
    """`text_embedding` in split mode: frozen base rows (buffer) + trainable new rows (parameter)."""

    def __init__(self, base_rows: int, new_rows: int, dim: int):
        super().__init__()
        self.register_buffer("base", torch.zeros(base_rows, dim))
        self.new = nn.Parameter(torch.empty(new_rows, dim).normal_(std=0.02))

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base, self.new])

    def base_row_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.base,)

    @torch.no_grad()
    def load_rows(self, weight: torch.Tensor) -> None:
        self.base.copy_(weight[: len(self.base)])
        self.new.copy_(weight[len(self.base):])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class SplitHead(nn.Module):
    """`text_head` in split mode: frozen base weight/bias rows (buffers) + trainable new rows (parameters)."""

    def __init__(self, base_rows: int, new_rows: int, dim: int):
        super().__init__()
        bound = 1 / math.sqrt(dim)
        self.register_buffer("base_weight", torch.zeros(base_rows, dim))
        self.register_buffer("base_bias", torch.zeros(base_rows))
        self.new_weight = nn.Parameter(torch.empty(new_rows, dim).uniform_(-bound, bound))
        self.new_bias = nn.Parameter(torch.empty(new_rows).uniform_(-bound, bound))

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base_weight, self.new_weight])

    @property
    def bias(self) -> torch.Tensor:
        return torch.cat([self.base_bias, self.new_bias])

    def base_row_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.base_weight, self.base_bias

    @torch.no_grad()
    def load_rows(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        b = len(self.base_bias)
        self.base_weight.copy_(weight[:b])
        self.new_weight.copy_(weight[b:])
        self.base_bias.copy_(bias[:b])
        self.new_bias.copy_(bias[b:])

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.weight_and_bias())


def zero_base_rows_hook(base_rows: int):
    """The community trainers' freeze: a gradient hook that zeroes rows 0..B-1 of a text-row gradient."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:base_rows] = 0
        return grad

    return hook


def hooked(param: torch.Tensor, base_rows: int) -> torch.Tensor:
    """param, with the zeroing hook on the gradient that flows into it. Registered per forward on a view, so
    moving or re-creating the parameter (`.to`, `to_empty`, DDP) cannot lose the hook."""
    if not (param.requires_grad and torch.is_grad_enabled()):
        return param
    view = param.view_as(param)
    view.register_hook(zero_base_rows_hook(base_rows))
    return view


class HookedEmbedding(nn.Module):
    """`text_embedding` in hooks mode (comparison only): one [N+1, D] parameter, base-row grads zeroed.

    AdamW weight decay and leftover Adam moments still move the "frozen" rows; that is what it is kept to show.
    """

    def __init__(self, base_rows: int, new_rows: int, dim: int):
        super().__init__()
        self.base_rows = base_rows
        self.weight = nn.Parameter(torch.empty(base_rows + new_rows, dim).normal_(std=0.02))

    def base_row_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.weight.detach()[: self.base_rows],)

    @torch.no_grad()
    def load_rows(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, hooked(self.weight, self.base_rows))


class HookedHead(nn.Module):
    """`text_head` in hooks mode (comparison only): full weight and bias parameters, base-row grads zeroed."""

    def __init__(self, base_rows: int, new_rows: int, dim: int):
        super().__init__()
        bound = 1 / math.sqrt(dim)
        self.base_rows = base_rows
        self.weight = nn.Parameter(torch.empty(base_rows + new_rows, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(base_rows + new_rows).uniform_(-bound, bound))

    def base_row_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weight.detach()[: self.base_rows], self.bias.detach()[: self.base_rows]

    @torch.no_grad()
    def load_rows(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight.copy_(weight)
        self.bias.copy_(bias)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return hooked(self.weight, self.base_rows), hooked(self.bias, self.base_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.weight_and_bias())


FREEZE_MODES = ("split", "hooks")  # how the base rows stay frozen: the --freeze option's choices


@dataclass
class Batch:
    """A collated batch: padded with 0 as the community collate does; lengths kept separately."""

    text_ids: torch.Tensor  # [B, T] long
    text_lengths: torch.Tensor  # [B]
    codes: torch.Tensor  # [B, C] long
    code_lengths: torch.Tensor  # [B]
    condition: torch.Tensor  # [B, 32, D]
    emo_vec: torch.Tensor  # [B, D]
    # (text, mel) targets scored, counted while the lengths were on the host: the loss gathers them with no sync
    scored: tuple[int, int] | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.text_ids, self.text_lengths, self.codes, self.code_lengths, self.condition, self.emo_vec

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()), scored=self.scored_counts())

    def pin_memory(self) -> Batch:
        """What DataLoader(pin_memory=True) calls: page-locked tensors make a non_blocking copy really async."""
        return Batch(*(t.pin_memory() for t in self.tensors()), scored=self.scored_counts())

    def scored_counts(self) -> tuple[int, int] | None:
        if self.scored is None and self.text_lengths.device.type == "cpu":
            n = self.size
            return int(self.text_lengths.sum()) + n, int(self.code_lengths.sum()) + n
        return self.scored

    @property
    def size(self) -> int:
        return self.text_ids.shape[0]


@dataclass
class LossSums:
    """Token-weighted sums, so that losses can be normalised over a global batch (accumulation, DDP)."""

    text_ce: torch.Tensor
    text_tokens: torch.Tensor
    mel_ce: torch.Tensor
    mel_tokens: torch.Tensor
    mel_correct: torch.Tensor

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_ce / self.text_tokens.clamp_min(1), self.mel_ce / self.mel_tokens.clamp_min(1)


def aligned_inputs_and_targets(ids: torch.Tensor, lengths: torch.Tensor, start: int, stop: int):
    """Upstream's layout: pad with stop from each length, append one stop, then shift by a start token."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    padded = torch.where(positions[None, :] < lengths[:, None], ids, torch.full_like(ids, stop))
    padded = F.pad(padded, (0, 1), value=stop)
    inputs = F.pad(padded, (1, 0), value=start)
    targets = F.pad(padded, (0, 1), value=stop)
    return inputs, targets


def valid_mask(width: int, lengths: torch.Tensor) -> torch.Tensor:
    """Targets j < n + 1 are scored: the n tokens plus the first stop."""
    return torch.arange(width, device=lengths.device)[None, :] < (lengths + 1)[:, None]


def scored_rows(hidden: torch.Tensor, offset: int, targets: torch.Tensor, mask: torch.Tensor,
                count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states [N, D] and targets [N] of the N positions where mask [B, W] is set; target (b, j) is
    predicted at hidden position (b, offset + j). Given N from the host, no device sync (x[mask] reads N back)."""
    if count is None:
        count = int(mask.sum())
    b, j = torch.nonzero_static(mask, size=count).unbind(1)
    rows = hidden.flatten(0, 1).index_select(0, b * hidden.shape[1] + offset + j)
    return rows, targets.flatten().index_select(0, b * targets.shape[1] + j)


def chunk_cross_entropy(rows: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                        targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(rows).float()
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.detach().argmax(-1) == targets).sum()


def chunked_cross_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                          targets: torch.Tensor, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of head(hidden) [N, V] against targets [N], and how many argmaxes hit them.

    chunk_rows rows at a time, each chunk checkpointed when there are several: backward recomputes a chunk's
    logits, so the fp32 logits (and their softmax) of all N rows are never held at once.
    """
    ce = torch.zeros((), device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    # a lone chunk's logits are the peak whether kept or recomputed (backward starts where forward ends)
    recompute = torch.is_grad_enabled() and hidden.shape[0] > chunk_rows
    for start in range(0, hidden.shape[0], chunk_rows):
        rows, tgt = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if recompute:
            chunk_ce, hits = checkpoint(chunk_cross_entropy, rows, head, tgt, use_reentrant=False,
                                        preserve_rng_state=False)  # nothing random in a head
        else:
            chunk_ce, hits = chunk_cross_entropy(rows, head, tgt)
        ce, correct = ce + chunk_ce, correct + hits
    return ce, correct


DURATION_DROPOUT = 0.3  # the community trainers' default p for the duration slot falling back to speed_emb(0)


class UnifiedVoiceGPT(nn.Module):
    """The training path of IndexTTS2's UnifiedVoice, names as upstream's state_dict.

    freeze: "split" (base text rows are buffers; the default) or "hooks" (full text parameters with base-row
    gradients zeroed, the community trainers' way, for comparison only).
    duration_control: the duration slot (prefix position 32) holds mel_pos_embedding(code length) instead of
    speed_emb(1), replaced by speed_emb(0) per item with probability duration_dropout in training, and in
    validation too while drop_duration_in_eval is set (the community trainer validates that way).
    activation_checkpointing: recompute each block in backward (memory for compute); see also compile_blocks.
    """

    def __init__(self, cfg: GPTConfig, base_rows: int, freeze: str = "split", duration_control: bool = False,
                 duration_dropout: float = DURATION_DROPOUT, activation_checkpointing: bool = False):
        super().__init__()
        if not 0 <= base_rows <= cfg.text_rows:
            raise ValueError(f"base_rows {base_rows} outside 0..{cfg.text_rows}")
        if freeze not in FREEZE_MODES:
            raise ValueError(f"freeze {freeze!r}: choose from {', '.join(FREEZE_MODES)}")
        if not 0.0 <= duration_dropout <= 1.0:
            raise ValueError(f"duration_dropout {duration_dropout} outside 0..1")
        self.cfg = cfg
        self.base_rows = base_rows
        self.freeze = freeze
        self.duration_control = duration_control
        self.duration_dropout = duration_dropout
        self.drop_duration_in_eval = False  # validation sets it (trainer.training.metrics.evaluate)
        dim = cfg.model_dim
        new_rows = cfg.text_rows - base_rows
        embedding, head = (SplitEmbedding, SplitHead) if freeze == "split" else (HookedEmbedding, HookedHead)
        self.text_embedding = embedding(base_rows, new_rows, dim)
        self.mel_embedding = nn.Embedding(cfg.number_mel_codes, dim)
        nn.init.normal_(self.mel_embedding.weight, std=0.02)
        self.gpt = Backbone(dim, cfg.layers, cfg.heads)
        self.mel_pos_embedding = LearnedPositions(cfg.mel_positions, dim)
        self.text_pos_embedding = LearnedPositions(cfg.text_positions, dim)
        self.final_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.text_head = head(base_rows, new_rows, dim)
        self.mel_head = nn.Linear(dim, cfg.number_mel_codes)
        self.speed_emb = nn.Embedding(2, dim)
        nn.init.normal_(self.speed_emb.weight, std=0.02)
        self.ce_chunk_rows = CE_CHUNK_ROWS
        self.set_activation_checkpointing(activation_checkpointing)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for block in self.gpt.h:
            block.checkpointing = enabled

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile each block's forward in place, so state_dict keys keep their names (no `_orig_mod.`).
        The blocks share one compiled graph; dynamic shapes, as bucketed batches change B and T every step.
        backend: "aot_eager" traces the same graphs without generating code (the GPU suite's CPU dry run)."""
        for block in self.gpt.h:
            block.compile(dynamic=True, backend=backend)

    def base_row_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows 0..B-1 of text_embedding.weight, text_head.weight and text_head.bias (views, no copy)."""
        return (*self.text_embedding.base_row_tensors(), *self.text_head.base_row_tensors())

    def duration_slot(self, code_lengths: torch.Tensor) -> torch.Tensor:
        """Prefix position 32, [B, D]."""
        speed = self.speed_emb.weight
        n = code_lengths.shape[0]
        if not self.duration_control:
            return speed[1].expand(n, -1)
        slot = self.mel_pos_embedding.emb(code_lengths.clamp(max=self.cfg.mel_positions - 1))
        if (self.training or self.drop_duration_in_eval) and self.duration_dropout > 0:
            free = torch.rand(n, device=slot.device) < self.duration_dropout
            slot = torch.where(free[:, None], speed[0].expand_as(slot), slot)
        return slot

    def backbone_states(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The backbone's output [B, prefix + T+2 + C+2, D] (before final_norm), text targets, mel targets."""
        cfg = self.cfg
        text_in, text_tgt = aligned_inputs_and_targets(
            batch.text_ids, batch.text_lengths, cfg.start_text_token, cfg.stop_text_token)
        mel_in, mel_tgt = aligned_inputs_and_targets(
            batch.codes, batch.code_lengths, cfg.start_mel_token, cfg.stop_mel_token)
        n = batch.size
        prefix = torch.cat([
            batch.condition + batch.emo_vec[:, None, :],
            self.duration_slot(batch.code_lengths)[:, None, :],
            self.speed_emb.weight[0].expand(n, 1, -1),  # free-duration slot
        ], dim=1)
        text_emb = self.text_embedding(text_in) + self.text_pos_embedding(text_in.shape[1])
        mel_emb = self.mel_embedding(mel_in) + self.mel_pos_embedding(mel_in.shape[1])
        return self.gpt(torch.cat([prefix.to(text_emb.dtype), text_emb, mel_emb], dim=1)), text_tgt, mel_tgt

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns text logits [B, T+2, N+1], text targets, mel logits [B, C+2, M], mel targets."""
        states, text_tgt, mel_tgt = self.backbone_states(batch)
        hidden = self.final_norm(states[:, self.cfg.prefix_len:])
        text_width = text_tgt.shape[1]
        return self.text_head(hidden[:, :text_width]), text_tgt, self.mel_head(hidden[:, text_width:]), mel_tgt

    def loss_sums(self, batch: Batch) -> LossSums:
        """Masked cross-entropy as the community trainers compute it, kept as token-weighted sums.

        Only scored positions reach final_norm and the heads (no logits for padding), in checkpointed chunks.
        """
        states, text_tgt, mel_tgt = self.backbone_states(batch)
        text_mask = valid_mask(text_tgt.shape[1], batch.text_lengths)
        mel_mask = valid_mask(mel_tgt.shape[1], batch.code_lengths)
        text_count, mel_count = batch.scored_counts() or (None, None)
        text_start = self.cfg.prefix_len
        text_rows, text_targets = scored_rows(states, text_start, text_tgt, text_mask, text_count)
        mel_rows, mel_targets = scored_rows(states, text_start + text_tgt.shape[1], mel_tgt, mel_mask, mel_count)
        text_weight, text_bias = self.text_head.weight_and_bias()  # once, not per chunk (split mode concatenates)
        text_ce, _ = chunked_cross_entropy(self.final_norm(text_rows), lambda h: F.linear(h, text_weight, text_bias),
                                           text_targets, self.ce_chunk_rows)
        mel_ce, mel_correct = chunked_cross_entropy(self.final_norm(mel_rows), self.mel_head, mel_targets,
                                                    self.ce_chunk_rows)
        return LossSums(text_ce, text_mask.sum(), mel_ce, mel_mask.sum(), mel_correct)


TRAINING_PATH_PREFIXES = (
    "text_embedding.", "mel_embedding.", "gpt.", "mel_pos_embedding.", "text_pos_embedding.",
    "final_norm.", "text_head.", "mel_head.", "speed_emb.",
)
SPLIT_KEYS = ("text_embedding.weight", "text_head.weight", "text_head.bias")
TEXT_ROW_PREFIXES = ("text_embedding.", "text_head.")


def is_training_path_key(key: str) -> bool:
    return key.startswith(TRAINING_PATH_PREFIXES)


def upstream_state_dict(model: UnifiedVoiceGPT) -> dict[str, torch.Tensor]:
    """The model's tensors under upstream's key names and order, split text rows merged back."""
    out = {}
    for key, value in model.state_dict().items():
        module = key.split(".", 1)[0]
        if module == "text_embedding" and "text_embedding.weight" not in out:
            out["text_embedding.weight"] = model.text_embedding.weight.detach().clone()
        elif module == "text_head" and "text_head.weight" not in out:
            out["text_head.weight"] = model.text_head.weight.detach().clone()
            out["text_head.bias"] = model.text_head.bias.detach().clone()
        elif module not in ("text_embedding", "text_head"):
            out[key] = value
    return out


def load_upstream_state_dict(model: UnifiedVoiceGPT, state: dict[str, torch.Tensor]) -> None:
    """Load upstream-named training-path tensors (text rows already of the model's size) strictly."""
    rows = model.cfg.text_rows
    wrong = [f"{k} {tuple(state[k].shape)}" for k in SPLIT_KEYS if k in state and state[k].shape[0] != rows]
    absent = [k for k in SPLIT_KEYS if k not in state]
    if wrong or absent:
        raise KeyError(f"text rows do not match the model's {rows}: missing {absent}, wrong {wrong}")
    model.text_embedding.load_rows(state["text_embedding.weight"])
    model.text_head.load_rows(state["text_head.weight"], state["text_head.bias"])
    own = {k: v for k, v in state.items() if k not in SPLIT_KEYS}
    text_names = {k for k in model.state_dict() if k.startswith(TEXT_ROW_PREFIXES)}
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [k for k in missing if k not in text_names]
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
