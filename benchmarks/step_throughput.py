"""fidel's training step against the step the community trainers run, interleaved in one process.

    .venv/bin/python -m benchmarks.step_throughput --size tiny            # CPU: minutes
    .venv/bin/python -m benchmarks.step_throughput --size full --batch-size 32 --amp bf16   # one GPU

benchmarks/gpu_suite.py runs it at batch 16 and 32, eager and compiled, with and without activation checkpointing.

fidel: `UnifiedVoiceGPT` (split freeze: base text rows are buffers; SDPA attention, causal, no mask tensor;
cross-entropy over the scored positions only, in checkpointed row chunks), length-bucketed batches under a token
budget (`BucketBatchSampler(max_tokens=batch size × mean item length)`), AdamW groups by name (`make_optimizer`:
fused on CUDA), and the training loop's own `accumulate` and `optimizer_step` (trainer/training/step.py: no host sync in
the step on CUDA). Optionally `--compile` (`UnifiedVoiceGPT.compile_blocks`: torch.compile of each block, dynamic
shapes; `fidel train --compile`) and `--checkpointing` (`UnifiedVoiceGPT.set_activation_checkpointing`, for
memory; `fidel train --activation-checkpointing`).

baseline, built as the community trainers build it: `transformers.GPT2Model` (sdpa attention, gradient
checkpointing on as `checkpointing=True` gives it, dropout 0.1, wte deleted, wpe returning zeros) inside the
same UnifiedVoice embeddings and heads; full text rows with gradient-zeroing hooks (freeze="hooks"); random
batches of a fixed size; cross-entropy over every padded position, masked by multiplication; one foreach AdamW
group; clipping 1.0; the same precision.

Synthetic data with a realistic length distribution: codes of 2-15 s at 50 Hz, text ids at 4-8 per second
(size "dry", the GPU suite's CPU dry run: 0.5-2 s clips and small vocabularies, seconds on a CPU).
Real tokens of a pair are its text ids plus its codes (padding efficiency = real ÷ computed, as in
benchmarks/padding_efficiency.py). MFU counts the model FLOPs of the real positions only (prefix, text and
codes with their start/stop: what a step with no padding must compute): 6 × matmul parameters per position
(each head on its own span) + 12 × layers × dim × sequence length for attention, divided by step time and the
peak (H100/H200 bf16 dense 989 TFLOP/s; on CPU a measured fp32 matmul peak of this machine, so the CPU MFU is
relative to what this CPU reaches on a large matmul). Each rate is the median of per-step rates; the
aggregate (all tokens ÷ all time) is printed beside it.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fidel_tts.trainer.data.manifest import (
    BucketBatchSampler,
    Example,
    collate,
    padding_efficiency,
    random_batches,
)
from fidel_tts.trainer.model.config import GPTConfig
from fidel_tts.trainer.model.gpt import Batch, UnifiedVoiceGPT, valid_mask
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.training.metrics import MetricWindow, NonFiniteWatch
from fidel_tts.trainer.training.optim import make_optimizer, param_groups
from fidel_tts.trainer.training.options import TrainConfig
from fidel_tts.trainer.training.step import LossModel, accumulate, optimizer_step, skips_on_device


@dataclass(frozen=True)
class Size:
    dim: int
    layers: int
    heads: int
    text_tokens: int = 24000  # the extended vocabulary; the base holds half of it (12000 pieces)
    mel_codes: int = 8194
    seconds: tuple[float, float] = (2.0, 15.0)  # clip lengths of the synthetic pairs


SIZES = {  # tiny and full keep the real 24001-row text head and 8194-code mel head
    "dry": Size(64, 2, 2, text_tokens=2000, mel_codes=258, seconds=(0.5, 2.0)),
    "tiny": Size(128, 4, 4),
    "full": Size(1280, 24, 20),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# ----------------------------------------------------------------------------- data

def synthetic_pairs(n: int, size: str, seed: int, seconds: tuple[float, float] | None = None) -> list[Example]:
    """n pairs of random lengths in the size's clip range (or `seconds`: (s, s) gives n pairs of one length)."""
    spec = SIZES[size]
    low, high = seconds or spec.seconds
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        clip = rng.uniform(low, high)
        codes = int(clip * 50)
        text = max(3, int(clip * rng.uniform(4.0, 8.0)))
        pairs.append(Example(
            text_ids=torch.randint(2, spec.text_tokens, (text,), generator=gen),
            codes=torch.randint(0, spec.mel_codes - 2, (codes,), generator=gen),
            condition=torch.randn(32, spec.dim, generator=gen) * 0.1,
            emo_vec=torch.randn(spec.dim, generator=gen) * 0.1,
        ))
    return pairs


def gpt_config(size: str) -> GPTConfig:
    spec = SIZES[size]
    return GPTConfig(model_dim=spec.dim, layers=spec.layers, heads=spec.heads, max_text_tokens=600,
                     max_mel_tokens=1815, number_text_tokens=spec.text_tokens, number_mel_codes=spec.mel_codes,
                     start_mel_token=spec.mel_codes - 2, stop_mel_token=spec.mel_codes - 1)


def base_rows(cfg: GPTConfig) -> int:
    """The base's text rows: half the extended vocabulary (12000 of 24000 pieces) plus the stop row."""
    return cfg.number_text_tokens // 2 + 1


# ----------------------------------------------------------------------------- the community baseline

class NullPositions(torch.nn.Module):
    """Upstream replaces gpt.wpe with a function returning zeros: positions come from its own tables."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, position_ids.shape[-1], self.dim, device=position_ids.device)


class HFBackbone(torch.nn.Module):
    """transformers.GPT2Model as UnifiedVoice builds it (checkpointing=True, use_cache=False, sdpa)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(vocab_size=256, n_positions=cfg.mel_positions + cfg.text_positions + cfg.prefix_len,
                            n_embd=cfg.model_dim, n_layer=cfg.layers, n_head=cfg.heads, use_cache=False,
                            attn_implementation="sdpa")  # resid/embd/attn dropout default to 0.1
        self.gpt = GPT2Model(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.gpt.gradient_checkpointing_enable()
        del self.gpt.wte
        self.gpt.wpe = NullPositions(cfg.model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt(inputs_embeds=x, return_dict=True).last_hidden_state


def community_model(cfg: GPTConfig) -> UnifiedVoiceGPT:
    model = UnifiedVoiceGPT(cfg, base_rows=base_rows(cfg), freeze="hooks")
    model.gpt = HFBackbone(cfg)
    return model


def community_loss(model: UnifiedVoiceGPT, batch: Batch) -> torch.Tensor:
    """compute_losses of the community trainers: CE over every position, masked by multiplication."""
    text_logits, text_tgt, mel_logits, mel_tgt = model(batch)
    text_mask = valid_mask(text_tgt.shape[1], batch.text_lengths).float()
    mel_mask = valid_mask(mel_tgt.shape[1], batch.code_lengths).float()
    text_ce = F.cross_entropy(text_logits.transpose(1, 2), text_tgt, reduction="none")
    mel_ce = F.cross_entropy(mel_logits.transpose(1, 2), mel_tgt, reduction="none")
    text_loss = (text_ce * text_mask).sum() / text_mask.sum().clamp_min(1)
    mel_loss = (mel_ce * mel_mask).sum() / mel_mask.sum().clamp_min(1)
    return 0.2 * text_loss + 0.8 * mel_loss


@dataclass
class Setup:
    name: str
    model: UnifiedVoiceGPT
    step: callable  # (batch on host) -> None
    batches: list[list[int]]
    check: callable = lambda: None  # after a timed step: raise if it went wrong
    optimizer: torch.optim.Optimizer | None = None


def baseline_setup(cfg, pairs, batch_size, seed, device, dtype) -> Setup:
    torch.manual_seed(seed)
    model = community_model(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, foreach=True)

    def step(batch: Batch) -> None:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = community_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = [b for e in range(8) for b in random_batches(len(pairs), batch_size, seed, e) if len(b) == batch_size]
    return Setup("baseline", model, step, batches, optimizer=optimizer)


def fidel_setup(cfg, pairs, batch_size, seed, device, dtype, compile_backend: str | None, checkpointing: bool,
                freeze: str = "split") -> Setup:
    """compile_backend: None runs eager; "inductor" is `fidel train --compile` (the dry run uses "aot_eager")."""
    torch.manual_seed(seed)
    model = UnifiedVoiceGPT(cfg, base_rows=base_rows(cfg), freeze=freeze, activation_checkpointing=checkpointing)
    model = model.to(device).train()
    if compile_backend:
        model.compile_blocks(backend=compile_backend)
    optimizer = make_optimizer(param_groups(model, 2e-5, 1e-4, 0.01), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    tc = TrainConfig(train_manifests=[], val_manifests=[], tokenizer="", config="", output_dir="", seed=seed)
    env = Dist()  # one process
    wrapped, window = LossModel(model), MetricWindow(device)
    watch = NonFiniteWatch(device, env, on_device=skips_on_device(optimizer))
    counter = [0]

    def step(batch: Batch) -> None:
        counter[0] += 1
        losses = accumulate(wrapped, [(counter[0], batch)], tc, 0, device, dtype, scaler, window, env)
        optimizer_step(model, optimizer, scheduler, scaler, tc, watch, losses, counter[0])

    def check() -> None:
        if failure := watch.failure():
            raise RuntimeError(failure)

    texts = [len(p.text_ids) for p in pairs]
    codes = [len(p.codes) for p in pairs]
    budget = int(batch_size * statistics.mean(t + c for t, c in zip(texts, codes, strict=True)))
    sampler = BucketBatchSampler(texts, codes, batch_size, seed=seed, max_tokens=budget)
    batches = [b for e in range(8) for b in sampler.epoch_batches(e)]
    return Setup("fidel", model, step, batches, check, optimizer)


# ----------------------------------------------------------------------------- measuring

def model_flops(cfg: GPTConfig, text_len: int, code_len: int) -> float:
    """Training FLOPs of one pair over its real positions (6N per position + attention)."""
    d, layers = cfg.model_dim, cfg.layers
    text_pos, mel_pos = text_len + 2, code_len + 2
    seq = cfg.prefix_len + text_pos + mel_pos
    backbone = 12 * layers * d * d  # qkv 3d², proj d², mlp 8d² per layer
    heads = d * cfg.text_rows * text_pos + d * cfg.number_mel_codes * mel_pos
    return 6 * (backbone * seq + heads) + 12 * layers * d * seq * seq


def peak_flops(device: torch.device, override: float | None) -> tuple[float, str]:
    if override:
        return override * 1e12, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} bf16 dense"
        return 0.0, f"{name}: unknown peak (pass --peak-tflops)"
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * 1024**3 / (time.perf_counter() - started))
    return best, "measured fp32 1024² matmul on this CPU"


def saved_activation_bytes(setup: Setup, batch: Batch) -> int:
    """Bytes autograd keeps for backward during one forward (CPU's stand-in for peak memory)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        setup.step(batch)
    return sum(seen.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepRecord:
    seconds: float
    pairs: int
    real_tokens: int
    computed_tokens: int
    flops: float
    peak_bytes: int


def run_step(setup: Setup, index: int, pairs: list[Example], cfg: GPTConfig, device) -> StepRecord:
    ids = setup.batches[index % len(setup.batches)]
    examples = [pairs[i] for i in ids]
    batch = collate(examples)
    if device.type == "cuda":
        batch = batch.pin_memory()  # as the training loop's DataLoader(pin_memory=True) hands it over
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    started = time.perf_counter()
    setup.step(batch)
    sync(device)
    seconds = time.perf_counter() - started
    setup.check()
    texts, codes = [len(e.text_ids) for e in examples], [len(e.codes) for e in examples]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return StepRecord(seconds, len(ids), sum(texts) + sum(codes), len(ids) * (max(texts) + max(codes)),
                      sum(model_flops(cfg, t, c) for t, c in zip(texts, codes, strict=True)), peak)


def summary(records: list[StepRecord], peak: float) -> dict:
    time_total = sum(r.seconds for r in records)
    return {
        "pairs_s": statistics.median(r.pairs / r.seconds for r in records),
        "tokens_s": statistics.median(r.real_tokens / r.seconds for r in records),
        "tokens_s_aggregate": sum(r.real_tokens for r in records) / time_total,
        "pairs_per_step": statistics.mean(r.pairs for r in records),
        "efficiency": sum(r.real_tokens for r in records) / sum(r.computed_tokens for r in records),
        "mfu": (statistics.median(r.flops / r.seconds for r in records) / peak) if peak else float("nan"),
        "peak_gib": max(r.peak_bytes for r in records) / 2**30,
        "step_ms": 1000 * statistics.median(r.seconds for r in records),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 tiny, 32 full")
    parser.add_argument("--steps", type=int, default=20, help="measured steps of each setup (≥ 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=None, help="synthetic pairs (default 40 × batch size)")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile fidel's backbone (dynamic shapes)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in fidel's blocks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 20:
        parser.error("--steps must be ≥ 20")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    batch_size = args.batch_size or (32 if args.size == "full" else 4)
    cfg = gpt_config(args.size)
    pairs = synthetic_pairs(args.pairs or 40 * batch_size, args.size, args.seed)
    texts, codes = [len(p.text_ids) for p in pairs], [len(p.codes) for p in pairs]
    peak, peak_note = peak_flops(device, args.peak_tflops)

    setups = [fidel_setup(cfg, pairs, batch_size, args.seed, device, dtype, "inductor" if args.compile else None,
                          args.checkpointing),
              baseline_setup(cfg, pairs, batch_size, args.seed, device, dtype)]
    trainable = {s.name: sum(p.numel() for p in s.model.parameters() if p.requires_grad) for s in setups}
    print(f"size {args.size} (dim {cfg.model_dim}, {cfg.layers} layers, {cfg.text_rows} text rows, "
          f"{cfg.number_mel_codes} mel codes), device {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, precision {amp}, "
          f"batch size {batch_size}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"trainable parameters: fidel {trainable['fidel'] / 1e6:.1f}M, baseline {trainable['baseline'] / 1e6:.1f}M;"
          f" {len(pairs)} pairs, codes {min(codes)}-{max(codes)}, text ids {min(texts)}-{max(texts)}; "
          f"peak {peak / 1e12:.3g} TFLOP/s ({peak_note})")
    print(f"batching: fidel bucketed, token budget → {statistics.mean(len(b) for b in setups[0].batches):.1f} pairs/"
          f"batch, padding efficiency {padding_efficiency(setups[0].batches, texts, codes):.3f}; baseline random, "
          f"efficiency {padding_efficiency(setups[1].batches, texts, codes):.3f}")

    sys.stdout.flush()
    for i in range(args.warmup):
        for s in setups:
            run_step(s, i, pairs, cfg, device)
    records: dict[str, list[StepRecord]] = {s.name: [] for s in setups}
    for i in range(args.warmup, args.warmup + args.steps):
        for s in setups if i % 2 else reversed(setups):  # alternate who goes first
            records[s.name].append(run_step(s, i, pairs, cfg, device))
    results = {name: summary(r, peak) for name, r in records.items()}

    if device.type == "cpu":
        for s in setups:  # one extra, untimed step each
            batch = collate([pairs[i] for i in s.batches[0]])
            results[s.name]["saved_mib"] = saved_activation_bytes(s, batch) / 2**20

    print(f"\n{'setup':>9} | {'pairs/s':>8} | {'real tok/s':>10} | {'(aggregate)':>11} | {'pairs/step':>10} | "
          f"{'pad. eff.':>9} | {'MFU':>6} | {'step ms':>8} | memory")
    for name, r in results.items():
        memory = (f"{r['peak_gib']:.2f} GiB peak" if device.type == "cuda"
                  else f"{r['saved_mib']:.0f} MiB saved for backward (batch 0)")
        print(f"{name:>9} | {r['pairs_s']:8.2f} | {r['tokens_s']:10.0f} | {r['tokens_s_aggregate']:11.0f} | "
              f"{r['pairs_per_step']:10.1f} | {r['efficiency']:9.3f} | {100 * r['mfu']:5.1f}% | {r['step_ms']:8.1f} | "
              f"{memory}")
    fidel, base = results["fidel"], results["baseline"]
    print(f"\nfidel / baseline: real tokens/s {fidel['tokens_s'] / base['tokens_s']:.2f}× (median of steps), "
          f"{fidel['tokens_s_aggregate'] / base['tokens_s_aggregate']:.2f}× (aggregate); "
          f"pairs/s {fidel['pairs_s'] / base['pairs_s']:.2f}×")
    if device.type == "cpu":
        print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0 if math.isfinite(fidel["tokens_s"]) else 1


if __name__ == "__main__":
    sys.exit(main())
