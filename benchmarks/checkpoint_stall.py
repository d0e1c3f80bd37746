"""How long a checkpoint save blocks the training loop: synchronous writes against the background writer.

    .venv/bin/python -m benchmarks.checkpoint_stall [--size demo|full] [--saves 5]

The model is `fidel demo`'s base shape (dim 128, 4 layers, 4 heads; 400 base + 700 new text pieces, 256
codes) or the full IndexTTS2 GPT (dim 1280, 24 layers, 24001 text rows, 8194 codes; for a GPU). The state is
what the training loop (`trainer.training.checkpointer`) saves: trainable tensors, AdamW state after real steps,
scheduler, RNG, lineage. Saves alternate between the synchronous writer and the background one, with training
steps between them so the background write competes with training as it does in a run. Blocked time is the loop's time inside the save
call; for the background writer that is the snapshot to CPU memory (plus any wait for a previous write).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from fidel_tts.trainer.model.config import GPTConfig
from fidel_tts.trainer.model.gpt import Batch, UnifiedVoiceGPT
from fidel_tts.trainer.training.build import trainable_state
from fidel_tts.trainer.training.checkpoint import rng_state
from fidel_tts.trainer.training.optim import make_optimizer, param_groups
from fidel_tts.trainer.training.writer import AsyncCheckpointWriter

SIZES = {  # dim, layers, heads, base text rows, text tokens, codebook
    "demo": (128, 4, 4, 401, 1100, 256),
    "full": (1280, 24, 20, 12001, 24000, 8192),
}


def build(size: str, device: torch.device):
    dim, layers, heads, base_rows, text_tokens, codebook = SIZES[size]
    cfg = GPTConfig(model_dim=dim, layers=layers, heads=heads, max_text_tokens=600, max_mel_tokens=1815,
                    number_text_tokens=text_tokens, number_mel_codes=codebook + 2, start_mel_token=codebook,
                    stop_mel_token=codebook + 1)
    torch.manual_seed(0)
    model = UnifiedVoiceGPT(cfg, base_rows=base_rows).to(device).train()
    optimizer = make_optimizer(param_groups(model, 1e-4, 1e-3, 0.01), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batch = Batch(torch.randint(2, text_tokens, (4, 40)), torch.full((4,), 40), torch.randint(0, codebook, (4, 200)),
                  torch.full((4,), 200), torch.randn(4, 32, dim), torch.randn(4, dim)).to(device)

    def step() -> None:
        sums = model.loss_sums(batch)
        (sums.text_ce / sums.text_tokens + sums.mel_ce / sums.mel_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def state(step_no: int) -> dict:
        return {"model": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": None, "step": step_no, "epoch": 0, "position": step_no,
                "accumulation_counter": 0, "rng": rng_state(), "lineage": {"id": "bench"}, "val_history": [],
                "best": None, "skipped_steps": 0, "train_config": {}}

    return model, step, state


def measure_stall(size: str, device: torch.device, saves: int, steps_between: int, folder: Path | None = None) -> dict:
    """Alternating synchronous and background saves with training steps between them: per writer, the loop's
    blocked time per save and the write time behind it (seconds)."""
    model, step, state = build(size, device)
    for _ in range(2):
        step()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        writers = {"synchronous": AsyncCheckpointWriter(background=False), "background": AsyncCheckpointWriter()}
        step_no = 0
        step_seconds = []
        for _ in range(saves):
            for name, writer in writers.items():
                for _ in range(steps_between):
                    started = time.perf_counter()
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    step_seconds.append(time.perf_counter() - started)
                step_no += 1
                writer.submit(Path(tmp) / name, step_no, state(step_no), {"reason": "bench"})
        for writer in writers.values():
            writer.wait()
        checkpoint_mb = max(p.stat().st_size for p in Path(tmp).rglob("*.pt")) / 1e6
    result = {"size": size, "device": str(device), "saves": saves, "steps_between": steps_between,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "checkpoint_mb": checkpoint_mb, "step_s_median": statistics.median(step_seconds)}
    for name, writer in writers.items():
        blocked = [t.blocked_s for t in writer.timings]
        written = [t.write_s for t in writer.timings]
        result[name] = {"blocked_s_median": statistics.median(blocked), "blocked_s_max": max(blocked),
                        "write_s_median": statistics.median(written)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--saves", type=int, default=5, help="saves of each kind")
    parser.add_argument("--steps-between", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    r = measure_stall(args.size, device, args.saves, args.steps_between, args.dir)
    print(f"size {args.size}: {r['trainable_params'] / 1e6:.1f}M trainable parameters, checkpoint "
          f"{r['checkpoint_mb']:.1f} MB, device {device}, {args.saves} saves each, {args.steps_between} training "
          f"steps between saves (median step {1000 * r['step_s_median']:.1f} ms)")
    print(f"{'writer':>12} | {'blocked per save (median)':>25} | {'max':>9} | {'write time (median)':>19}")
    for name in ("synchronous", "background"):
        w = r[name]
        print(f"{name:>12} | {1000 * w['blocked_s_median']:22.1f} ms | {1000 * w['blocked_s_max']:6.1f} ms | "
              f"{1000 * w['write_s_median']:16.1f} ms")
    print(f"blocked time: background ÷ synchronous = "
          f"{r['background']['blocked_s_median'] / r['synchronous']['blocked_s_median']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
