"""SIGKILL `fidel train` at random moments (checkpoint writes included), resume each time, and check that
the run ends with the same parameters as an uninterrupted one.

    .venv/bin/python -m benchmarks.kill_resume [--kills 20] [--seed 0]

Prints, per kill: the last step seen, the step resumed from, steps of work lost; then the totals.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from fidel_tts.trainer.training.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint

from tests.fixtures.synthetic import make_tiny_project

ROOT = Path(__file__).resolve().parents[1]

STEPS, SAVE_EVERY = 200, 4
STEP_LINE = re.compile(r"^step (\d+)/")


def train_command(project, out: Path) -> list[str]:
    return [sys.executable, "-m", "fidel_tts.flows.cli", "train", "--train-manifest", str(project.train_manifest),
            "--val-manifest", str(project.val_manifest), "--tokenizer", str(project.tokenizer),
            "--config", str(project.base_config), "--base-checkpoint", str(project.base_checkpoint),
            "--output-dir", str(out), "--max-steps", str(STEPS), "--batch-size", "8", "--grad-accumulation", "2",
            "--learning-rate", "3e-3", "--warmup-steps", "10", "--log-interval", "1", "--val-interval", "40",
            "--save-every", str(SAVE_EVERY), "--keep-checkpoints", "2", "--resume", "auto"]


def run_until_killed(command: list[str], kill_at_step: int, extra_delay: float) -> tuple[int, bool]:
    """Start training; SIGKILL it `extra_delay` s after it reports step `kill_at_step`.
    Returns (last step printed, finished on its own)."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last, reached = [0], threading.Event()

    def read():
        for line in proc.stdout:
            match = STEP_LINE.match(line)
            if match:
                last[0] = int(match.group(1))
                if last[0] >= kill_at_step:
                    reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not reached.is_set() and proc.poll() is None:
        reached.wait(0.05)
    if proc.poll() is not None:
        reader.join(timeout=5)
        return last[0], True
    time.sleep(extra_delay)
    proc.kill()
    proc.wait()
    reader.join(timeout=5)
    return last[0], False


def final_parameters(folder: Path) -> dict:
    newest, _ = latest_valid_checkpoint(folder)
    state, meta = load_checkpoint(newest)
    assert meta["step"] == STEPS, f"ended at step {meta['step']}, not {STEPS}"
    return state["model"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        project = make_tiny_project(tmp / "project")
        start = time.monotonic()
        subprocess.run(train_command(project, tmp / "straight"), cwd=ROOT, check=True, capture_output=True)
        straight_s = time.monotonic() - start
        reference = final_parameters(tmp / "straight")
        print(f"uninterrupted run: {STEPS} steps in {straight_s:.1f} s (incl. ~4 s start-up)")

        out, command = tmp / "killed", train_command(project, tmp / "killed")
        lost_steps, kills, worst = [], 0, 0
        resumed_from = 0
        while kills < args.kills:
            # half the kills land on a save step, a few milliseconds in: inside the checkpoint write
            on_save = kills % 2 == 0
            target = (resumed_from // SAVE_EVERY + rng.randint(1, 2)) * SAVE_EVERY if on_save else \
                resumed_from + rng.randint(1, 2 * SAVE_EVERY)
            delay = rng.uniform(0.0, 0.03) if on_save else rng.uniform(0.0, 0.5)
            last_seen, finished = run_until_killed(command, target, delay)
            if finished:
                break
            kills += 1
            newest, rejected = latest_valid_checkpoint(out)
            resumed_from = load_checkpoint(newest)[1]["step"] if newest else 0
            lost = max(0, last_seen - resumed_from)
            lost_steps.append(lost)
            worst = max(worst, lost)
            print(f"kill {kills:2d} at step {target} + {delay * 1000:3.0f} ms: last step seen {last_seen:3d}, newest valid checkpoint "
                  f"{resumed_from:3d}, lost {lost} step(s), rejected {len(rejected)}: "
                  + ", ".join(f"{p.name} ({why})" for p, why in rejected))
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        resumed = final_parameters(out)
        same = reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
        leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        print(f"\n{kills} kills; work lost per kill: max {worst} steps (save interval {SAVE_EVERY}), "
              f"mean {sum(lost_steps) / max(1, len(lost_steps)):.1f}")
        print(f"checkpoints left: {[p.name for p in list_checkpoints(out)]}; stale temp files: {leftovers}")
        print(f"final parameters equal to the uninterrupted run, bit for bit: {same}")
        return 0 if same and worst <= SAVE_EVERY else 1


if __name__ == "__main__":
    sys.exit(main())
