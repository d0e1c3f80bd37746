"""Peak RAM and wall time of `fidel triage` on a full-size community training checkpoint (about 8 GB).

Writes, under --root: the full-size layout fixture's gpt.pth (12001 text rows, 3.5 GB) and a community
`model_step25000.pth` extended to 24001 rows with AmV2's optimizer state (exp_avg and exp_avg_sq for the 301
parameters that get a gradient, docs/design.md §8): base rows shrunk as 25k steps of decay
leave them, moments zero on base rows. Then runs `fidel triage CKPT --base gpt.pth` under `/usr/bin/time -v`,
prints its decision, peak RSS and wall time, and deletes both files (unless --keep).

Run: .venv/bin/python -m benchmarks.triage_full_size --root /tmp/triage-full   (needs ~12 GB of disk)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from fidel_tts.trainer.checkpoints.triage import BUFFER_SUFFIXES
from fidel_tts.trainer.model.gpt import SPLIT_KEYS
from fidel_tts.trainer.model.weights import read_state_dict

from tests.fixtures.layout_fixture import RELEASE_GPT, write_layout_fixture

NEW_ROWS = 12000
STEP = 25000
SHRINK = 0.9974  # about what 25k steps of lr ≤ 2e-5, wd 0.01 leave (benchmarks/base_row_shrink.py)
NO_GRADIENT = ("conditioning_encoder.", "perceiver_encoder.", "emo_conditioning_encoder.", "emo_perceiver_encoder.",
               "emo_layer.", "emovec_layer.")  # AmV2: no state for these (reference §2)


def community_checkpoint(base_path: Path, out: Path) -> None:
    base = read_state_dict(base_path)  # memory-mapped
    gen = torch.Generator().manual_seed(0)
    model = {}
    for key, value in base.items():
        if key in SPLIT_KEYS:
            new = torch.randn((NEW_ROWS, *value.shape[1:]), generator=gen) * 0.02
            value = torch.cat([value * SHRINK, new])
        model[key] = value
    names = [k for k in model if not k.endswith(BUFFER_SUFFIXES)]
    state = {}
    for i, name in enumerate(names):
        if name.startswith(NO_GRADIENT):
            continue
        avg, sq = torch.zeros_like(model[name]), torch.zeros_like(model[name])
        if name in SPLIT_KEYS:  # hooks: moments only on the new rows
            avg[-NEW_ROWS:].normal_(std=1e-4, generator=gen)
            sq[-NEW_ROWS:].uniform_(0, 1e-8, generator=gen)
        state[i] = {"step": torch.tensor(float(STEP)), "exp_avg": avg, "exp_avg_sq": sq}
    group = {"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
             "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
             "decoupled_weight_decay": True, "initial_lr": 2e-5, "params": list(range(len(names)))}
    scheduler = {"base_lrs": [2e-5], "last_epoch": STEP, "_step_count": STEP + 1, "_is_initial": False,
                 "_get_lr_called_within_step": False, "_last_lr": [0.0], "lr_lambdas": [{}]}
    torch.save({"model": model, "optimizer": {"state": state, "param_groups": [group]}, "scheduler": scheduler,
                "scaler": None, "epoch": 3, "step": STEP, "batch_idx": 0, "recent_checkpoints": [],
                "accumulation_counter": 0, "extra": {"type": "step", "amp_dtype": "bfloat16"},
                "last_losses": {"text_loss": 2.1, "mel_loss": 3.9, "mel_top1": 0.3}}, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    root = Path(a.root)
    fixture = write_layout_fixture(root, RELEASE_GPT)
    ckpt = root / f"model_step{STEP}.pth"
    community_checkpoint(fixture.checkpoint, ckpt)
    print(f"{ckpt.name}: {ckpt.stat().st_size / 1e9:.2f} GB, base gpt.pth {fixture.checkpoint.stat().st_size / 1e9:.2f} GB")
    fidel = Path(sys.executable).with_name("fidel")
    run = subprocess.run(["/usr/bin/time", "-v", str(fidel), "triage", str(ckpt), "--base", str(fixture.checkpoint)],
                         capture_output=True, text=True)
    print(run.stdout.strip())
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time .*: (\S+)", run.stderr).group(1)
    print(f"exit {run.returncode}; peak RSS {peak / 1024 ** 2:.2f} GiB; wall {wall}")
    if not a.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
