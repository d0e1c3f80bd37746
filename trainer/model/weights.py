"""Base checkpoints in, upstream-layout checkpoints out.

A base `gpt.pth` is a plain state_dict; the community trainers wrap it as `{'model': ...}` (with optimizer,
scheduler, rng state, ...), Accelerate saves it as `model.safetensors` under `model.` (and `module.`) prefixes.
All of them are read with `weights_only=True`. Tensors the training path does not use (conditioning encoders,
perceivers, emotion projections) pass through untouched from base to export.

The expected layout is computed from config.yaml (`upstream_layout`): the training path from the `gpt:`
fields, the conditioning encoders and perceivers from `condition_module` / `emo_condition_module`. At the
release config it equals tests/data/indextts2_gpt_state_dict.json, key for key and in order.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:
    from numpy._core import multiarray as np_multiarray  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as np_multiarray

from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model.config import GPTConfig
from fidel_tts.trainer.model.gpt import SPLIT_KEYS, UnifiedVoiceGPT, is_training_path_key, upstream_state_dict

DROPPED_PREFIXES = ("inference_model.", "gpt.wte.")  # aliases post_init_gpt2_config adds; upstream drops them
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP, Accelerate's GPTLossWrapper, torch.compile
ACCELERATE_WEIGHTS = "model.safetensors"

# AmV2's latest.pth and instavar's checkpoints keep numpy's RNG state (a uint32 ndarray) in `rng_state`, and AmV2
# keeps torch.__version__. Exactly what unpickling those needs; numpy 1.x pickles name the reconstructor
# numpy.core.multiarray.
COMMUNITY_SAFE_GLOBALS = [
    (np_multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    (np_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType: MT19937 keys; no other dtype is allowed
    torch.torch_version.TorchVersion,  # AmV2's latest.pth `pytorch_version`: a str subclass, imports nothing else
]

# UnifiedVoice constructor constants that config.yaml does not carry (upstream model_v2.py defaults)
W2V_BERT_DIM = 1024  # conformer input and emotion perceiver width
POSITIONAL_TABLE = 5000  # RelPositionalEncoding max_len, a persistent buffer in gpt.pth
CONV_KERNEL = 15  # conformer conv module depthwise kernel
PERCEIVER_DEPTH = 2
PERCEIVER_DIM_HEAD = 64
EMO_LATENTS = 1


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def refused_global(exc: BaseException) -> str:
    """The line of torch's weights_only message that names what was refused."""
    lines = [line.strip() for line in str(exc).splitlines()]
    named = [line for line in lines if any(m in line.lower() for m in ("unsupported", "but got", "blocked"))]
    return (named[0] if named else first_line(exc))[:200]


def torch_load(path: str | Path, mmap: bool = False) -> object:
    """`torch.load` with weights_only=True (plus the numpy RNG-state and TorchVersion globals); every failure is one FidelError.

    mmap=True maps tensors from the file instead of reading them (a 3.5 GB gpt.pth costs no RAM until used).
    """
    path = Path(path)
    if not path.is_file():
        raise FidelError(path, "checkpoint not found")
    mmap = mmap and zipfile.is_zipfile(path)  # only the zip format can be mapped; legacy files are read
    try:
        with torch.serialization.safe_globals(COMMUNITY_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise FidelError(path, f"refused to load: not a plain-tensor checkpoint ({refused_global(exc)})") from exc
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError) as exc:
        raise FidelError(path, f"unreadable or truncated checkpoint ({first_line(exc)})") from exc


def read_checkpoint(path: str | Path) -> object:
    """A checkpoint file, or an Accelerate `checkpoint-N/` folder (its model.safetensors: no pickle at all)."""
    path = Path(path)
    if path.is_dir():
        weights = path / ACCELERATE_WEIGHTS
        if not weights.is_file():
            raise FidelError(path, f"a folder, but no {ACCELERATE_WEIGHTS} in it (an Accelerate checkpoint has one)")
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as exc:
            raise FidelError(weights, "reading safetensors needs the safetensors package "
                                      "(pip install safetensors)") from exc
        try:
            return load_file(weights, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise FidelError(weights, f"unreadable safetensors file ({first_line(exc)})") from exc
    return torch_load(path, mmap=True)


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`module.model.text_embedding.weight` → `text_embedding.weight`, only when every key has the prefix."""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def upstream_keys_of(raw: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The UnifiedVoice state_dict inside a plain or community checkpoint, minus what upstream drops."""
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FidelError(path, "no UnifiedVoice state_dict found (expected a plain state_dict, {'model': ...} "
                               "or an Accelerate model.safetensors)")
    state = strip_wrapper_prefixes(state)
    return {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    return upstream_keys_of(read_checkpoint(path), path)


# ----------------------------------------------------------------------------- the expected layout

Shapes = dict[str, tuple[int, ...]]


def conformer_shapes(prefix: str, module: dict) -> Shapes | None:
    """A ConformerEncoder with conv2d2 subsampling over w2v-BERT features; None for other input layers."""
    if module.get("input_layer", "conv2d2") != "conv2d2":
        return None
    d, units, heads = module["output_size"], module["linear_units"], module["attention_heads"]
    shapes = {
        "embed.conv.0.weight": (d, 1, 3, 3), "embed.conv.0.bias": (d,),
        "embed.out.0.weight": (d, d * ((W2V_BERT_DIM - 1) // 2)), "embed.out.0.bias": (d,),
        "embed.pos_enc.pe": (1, POSITIONAL_TABLE, d),
        "after_norm.weight": (d,), "after_norm.bias": (d,),
    }
    for i in range(module["num_blocks"]):
        b = f"encoders.{i}."
        shapes.update({
            b + "self_attn.pos_bias_u": (heads, d // heads), b + "self_attn.pos_bias_v": (heads, d // heads),
            **{b + f"self_attn.linear_{x}.{p}": (d, d) if p == "weight" else (d,)
               for x in ("q", "k", "v", "out") for p in ("weight", "bias")},
            b + "self_attn.linear_pos.weight": (d, d),
            b + "feed_forward.w_1.weight": (units, d), b + "feed_forward.w_1.bias": (units,),
            b + "feed_forward.w_2.weight": (d, units), b + "feed_forward.w_2.bias": (d,),
            b + "conv_module.pointwise_conv1.weight": (2 * d, d, 1), b + "conv_module.pointwise_conv1.bias": (2 * d,),
            b + "conv_module.depthwise_conv.weight": (d, 1, CONV_KERNEL), b + "conv_module.depthwise_conv.bias": (d,),
            b + "conv_module.norm.weight": (d,), b + "conv_module.norm.bias": (d,),
            b + "conv_module.pointwise_conv2.weight": (d, d, 1), b + "conv_module.pointwise_conv2.bias": (d,),
            **{b + f"norm_{n}.{p}": (d,) for n in ("ff", "mha", "conv", "final") for p in ("weight", "bias")},
        })
    return {prefix + k: v for k, v in shapes.items()}


def perceiver_shapes(prefix: str, dim: int, context: int, latents: int, heads: int, mult: int) -> Shapes:
    """A PerceiverResampler: latents, context projection, depth × (attention, GEGLU feed-forward), RMS norm."""
    inner, ff = heads * PERCEIVER_DIM_HEAD, int(dim * mult * 2 / 3)
    shapes = {"latents": (latents, dim)}
    if context != dim:
        shapes.update({"proj_context.weight": (dim, context), "proj_context.bias": (dim,)})
    for i in range(PERCEIVER_DEPTH):
        b = f"layers.{i}."
        shapes.update({
            b + "0.to_q.weight": (inner, dim), b + "0.to_kv.weight": (2 * inner, dim), b + "0.to_out.weight": (dim, inner),
            b + "1.0.weight": (2 * ff, dim), b + "1.0.bias": (2 * ff,), b + "1.2.weight": (dim, ff), b + "1.2.bias": (dim,),
        })
    shapes["norm.gamma"] = (dim,)
    return {prefix + k: v for k, v in shapes.items()}


def training_shapes(cfg: GPTConfig) -> Shapes:
    """The training path, in upstream's state_dict order."""
    d, rows, mel = cfg.model_dim, cfg.text_rows, cfg.number_mel_codes
    shapes = {"text_embedding.weight": (rows, d), "mel_embedding.weight": (mel, d)}
    for i in range(cfg.layers):
        p = f"gpt.h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,),
        })
    shapes.update({
        "gpt.ln_f.weight": (d,), "gpt.ln_f.bias": (d,),
        "mel_pos_embedding.emb.weight": (cfg.mel_positions, d),
        "text_pos_embedding.emb.weight": (cfg.text_positions, d),
        "final_norm.weight": (d,), "final_norm.bias": (d,),
        "text_head.weight": (rows, d), "text_head.bias": (rows,),
        "mel_head.weight": (mel, d), "mel_head.bias": (mel,),
        "speed_emb.weight": (2, d),
    })
    return shapes


def expected_training_shapes(cfg: GPTConfig) -> Shapes:
    return training_shapes(cfg)


def conditioning_shapes(cfg: GPTConfig, gpt: dict | None) -> Shapes | None:
    """Encoders, perceivers and emotion projections of a conformer_perceiver UnifiedVoice, in upstream order;
    None when the config does not describe them (the tiny and demo bases have none)."""
    if not gpt or gpt.get("condition_type") != "conformer_perceiver":
        return None
    speaker, emo = gpt.get("condition_module"), gpt.get("emo_condition_module")
    if not isinstance(speaker, dict) or not isinstance(emo, dict):
        return None
    speaker_enc = conformer_shapes("conditioning_encoder.", speaker)
    emo_enc = conformer_shapes("emo_conditioning_encoder.", emo)
    if speaker_enc is None or emo_enc is None:
        return None
    d = cfg.model_dim
    return {
        **speaker_enc,
        **perceiver_shapes("perceiver_encoder.", d, speaker["output_size"], cfg.condition_num_latent,
                           speaker["attention_heads"], speaker["perceiver_mult"]),
        **emo_enc,
        **perceiver_shapes("emo_perceiver_encoder.", W2V_BERT_DIM, emo["output_size"], EMO_LATENTS,
                           emo["attention_heads"], emo["perceiver_mult"]),
        "emo_layer.weight": (d, d), "emo_layer.bias": (d,),
        "emovec_layer.weight": (d, W2V_BERT_DIM), "emovec_layer.bias": (d,),
    }


def upstream_layout(cfg: GPTConfig, gpt: dict | None = None) -> Shapes:
    """Every key of upstream's UnifiedVoice state_dict with its shape, in order (text rows = cfg.text_rows).

    Without conditioning sections in `gpt`, only the training path."""
    train = training_shapes(cfg)
    cond = conditioning_shapes(cfg, gpt)
    if cond is None:
        return train
    head = {k: v for k, v in cond.items() if not k.startswith(("emo_layer.", "emovec_layer."))}
    emo_proj = {k: v for k, v in cond.items() if k.startswith(("emo_layer.", "emovec_layer."))}
    rest = {k: v for k, v in train.items() if k != "text_embedding.weight"}
    return {**head, "text_embedding.weight": train["text_embedding.weight"], **emo_proj, **rest}


# ----------------------------------------------------------------------------- loading a base

@dataclass
class BaseCheckpoint:
    path: Path
    training: dict[str, torch.Tensor]  # upstream names, training path only
    passthrough: dict[str, torch.Tensor]  # everything else, exported unchanged
    key_order: list[str]  # the base file's key order, kept on export

    @property
    def text_rows(self) -> int:
        return self.training["text_embedding.weight"].shape[0]

    @property
    def base_rows(self) -> int:
        """B: base tokens. The checkpoint has B+1 text rows (the N+1 rule)."""
        return self.text_rows - 1


def layout_problems(state: dict[str, torch.Tensor], expected: Shapes, dtype: torch.dtype = torch.float32) -> list[str]:
    """What differs between a state dict and the expected layout (keys, shapes, dtype), naming the keys."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    other_dtype = [f"{k} {state[k].dtype}" for k in expected if k in state and state[k].dtype != dtype]
    return [f"{label}: {', '.join(keys[:4])}{f' … ({len(keys)} in all)' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                ("shape differs from config", wrong), (f"not {dtype}", other_dtype)) if keys]


def load_base_checkpoint(path: str | Path, cfg: GPTConfig, gpt: dict | None = None) -> BaseCheckpoint:
    """Load a base checkpoint (memory-mapped) and check it against the config, naming the keys that disagree.

    B is the checkpoint's text rows − 1. `gpt` is config.yaml's raw `gpt:` section: when it describes the
    conditioning encoders, the pass-through tensors are checked too.
    """
    path = Path(path)
    state = read_state_dict(path)
    emb = state.get("text_embedding.weight")
    if emb is None or emb.ndim != 2:
        raise FidelError(path, "missing key text_embedding.weight: not a UnifiedVoice checkpoint")
    if emb.shape[0] != cfg.text_rows:
        raise FidelError(path, f"text_embedding.weight has {emb.shape[0]} rows, but the config's number_text_tokens "
                               f"{cfg.number_text_tokens} wants {cfg.text_rows} (number_text_tokens + 1)")
    training = {k: v for k, v in state.items() if is_training_path_key(k)}
    passthrough = {k: v for k, v in state.items() if not is_training_path_key(k)}
    problems = layout_problems(training, training_shapes(cfg))
    cond = conditioning_shapes(cfg, gpt)
    if cond is not None:
        problems += [f"conditioning {p}" for p in layout_problems(passthrough, cond)]
    if problems:
        raise FidelError(path, f"does not match the config: {'; '.join(problems)}")
    layout = upstream_layout(cfg, gpt)
    # upstream's order where the layout is known (safetensors files store keys sorted), else the file's own
    key_order = list(layout) if set(layout) == set(state) else list(state)
    return BaseCheckpoint(path, training, passthrough, key_order)


# ----------------------------------------------------------------------------- hashes

def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as a uint8 view. A size-1 dim left with stride 0 (from `expand`) counts as contiguous yet cannot
    be viewed as bytes: such a tensor is copied first."""
    t = t.contiguous()
    if t.dim() and t.stride(-1) != 1:
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(torch.uint8)


def tensor_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(as_bytes(t.detach().to("cpu")).numpy().tobytes())
    return digest.hexdigest()


def base_rows_hash(emb: torch.Tensor, head_w: torch.Tensor, head_b: torch.Tensor, base_rows: int) -> str:
    """sha256 of rows 0..B-1 of text_embedding, text_head.weight and text_head.bias."""
    return tensor_sha256(emb[:base_rows], head_w[:base_rows], head_b[:base_rows])


def model_base_rows_hash(model: UnifiedVoiceGPT) -> str:
    return tensor_sha256(*model.base_row_tensors())


def base_checkpoint_rows_hash(base: BaseCheckpoint, base_rows: int) -> str:
    t = base.training
    return base_rows_hash(t["text_embedding.weight"], t["text_head.weight"], t["text_head.bias"], base_rows)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal calls NaN != NaN and -0.0 == 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(as_bytes(a), as_bytes(b))


# ----------------------------------------------------------------------------- export

def export_state_dict(model: UnifiedVoiceGPT, base: BaseCheckpoint, dtype: torch.dtype | None = None) -> dict:
    """Upstream's key set in the base file's order: trained tensors plus pass-through tensors."""
    trained = upstream_state_dict(model)
    out = {key: trained[key] if key in trained else base.passthrough[key] for key in base.key_order}
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def export_problems(exported: dict[str, torch.Tensor], base: BaseCheckpoint, text_rows: int,
                    dtype: torch.dtype = torch.float32) -> list[str]:
    """Why an exported state dict is not the base with text rows grown to text_rows (empty: it is).

    Keys and order equal the base's; shapes equal except the three text tensors' rows; dtype throughout.
    For a float32 export, base rows 0..B-1 and every pass-through tensor are byte-identical to the base file.
    """
    problems = []
    if list(exported) != base.key_order:
        missing = [k for k in base.key_order if k not in exported]
        extra = [k for k in exported if k not in base.key_order]
        problems.append(f"key set or order differs from the base (missing {missing[:3]}, extra {extra[:3]})")
        return problems
    base_state = {**base.training, **base.passthrough}
    for key, value in exported.items():
        want = tuple(base_state[key].shape)
        if key in SPLIT_KEYS:
            want = (text_rows, *want[1:])
        if tuple(value.shape) != want:
            problems.append(f"{key} shape {tuple(value.shape)} != {want}")
        if value.dtype != dtype:
            problems.append(f"{key} dtype {value.dtype} != {dtype}")
    if problems or dtype != torch.float32:
        return problems
    b = base.base_rows
    problems += [f"{k} base rows differ from the base file" for k in SPLIT_KEYS
                 if not same_bytes(exported[k][:b], base.training[k][:b])]
    problems += [f"{k} differs from the base file (pass-through)" for k in base.passthrough
                 if not same_bytes(exported[k], base.passthrough[k])]
    return problems


__all__ = [
    "BaseCheckpoint", "SPLIT_KEYS", "base_checkpoint_rows_hash", "base_rows_hash", "conditioning_shapes",
    "export_problems", "export_state_dict", "expected_training_shapes", "load_base_checkpoint",
    "model_base_rows_hash", "read_checkpoint", "read_state_dict", "same_bytes", "tensor_sha256", "torch_load",
    "training_shapes", "upstream_keys_of", "upstream_layout",
]
