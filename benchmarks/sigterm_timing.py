"""Seconds from SIGTERM to exit for `fidel train` on the demo model (finish the step, save, exit 75), and the
blocked time of an ordinary save.

    .venv/bin/python -m benchmarks.sigterm_timing --demo-root demo [--repeats 3]

Needs a built demo (`./run demo` or `fidel demo --quick`).
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(demo: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fidel_tts.flows.cli", "train", "--train-manifest", str(demo / "manifests/am_train.jsonl"),
            "--val-manifest", str(demo / "manifests/am_val.jsonl"), "--tokenizer", str(demo / "am_bpe.model"),
            "--config", str(demo / "base/config.yaml"), "--base-checkpoint", str(demo / "base/gpt.pth"),
            "--output-dir", str(out), "--epochs", "1000", "--batch-size", "16", "--log-interval", "1",
            "--val-interval", "100000", "--save-every", "100000", "--learning-rate", "5e-4", "--resume", "auto"]


def one(demo: Path, out: Path) -> tuple[float, float, int]:
    proc = subprocess.Popen(command(demo, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    step_times = []
    for line in proc.stdout:
        if re.match(r"^step \d+/", line):
            step_times.append(time.monotonic())
            if len(step_times) == 4:
                break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    return time.monotonic() - sent, statistics.mean(b - a for a, b in zip(step_times, step_times[1:], strict=False)), proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo-root", type=Path, default=ROOT / "demo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    demo = args.demo_root.resolve()
    if not (demo / "base" / "gpt.pth").is_file():
        print(f"error: {demo}: no built demo (run ./run demo or fidel demo --quick first)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            seconds, step_s, rc = one(demo, Path(tmp) / f"run{i}")
            print(f"SIGTERM → exit: {seconds:.2f} s (a step takes {step_s:.2f} s), exit code {rc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
