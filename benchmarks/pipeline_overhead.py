"""What the Prefect flow and MLflow tracking cost: the same training through `fidel run`'s flow and through the
bare training loop, interleaved in one process, as a ratio of training throughput.

    .venv/bin/python -m benchmarks.pipeline_overhead [--steps 150] [--repeats 2]

Throughput is optimizer steps per second of the training stage itself (the loop's wall time, saves, validation
and metric logging included), both reading the Parquet dataset the flow's data stage built; the flow's fixed
start-up (temporary Prefect server, data checks, tokenizer verification, gates) is printed separately.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["PREFECT_HOME"] = str(tmp / "prefect")
        from fidel_tts.flows.finetune import finetune
        from fidel_tts.trainer.training.options import TrainConfig
        from fidel_tts.trainer.training.trainer import train

        from tests.fixtures.synthetic import make_tiny_project

        project = make_tiny_project(tmp / "project", n_train=160, n_val=32, dim=128, layers=4)
        train_settings = {"max_steps": args.steps, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 10,
                          "log_interval": 10, "val_interval": 50, "save_interval": 50}
        common = {"tokenizer": str(project.tokenizer), "config": str(project.base_config),
                  "base_checkpoint": str(project.base_checkpoint)}
        bare_rates, flow_rates, flow_walls = [], [], []

        def bare_run(out: Path, data: Path, steps: int) -> float:
            """The bare loop on the Parquet dataset the flow's data stage built: the same data path."""
            tc = TrainConfig(train_manifests=[str(data / "train.parquet")], val_manifests=[str(data / "val.parquet")],
                             output_dir=str(out), **common, **{**train_settings, "max_steps": steps})
            result = train(tc)
            shutil.rmtree(out, ignore_errors=True)
            return result.step / result.wall_seconds

        for repeat in range(args.repeats):
            started = time.monotonic()
            flow_dir = tmp / f"flow{repeat}"
            summary = finetune(settings={
                "train_manifests": [str(project.train_manifest)], "val_manifests": [str(project.val_manifest)],
                "base_tokenizer": str(project.base_tokenizer), "output_dir": str(flow_dir),
                "tracking_uri": f"sqlite:///{tmp}/mlruns{repeat}/mlflow.db", "train": train_settings, **common})
            flow_walls.append(time.monotonic() - started)
            flow_rates.append(summary["step"] / summary["train_seconds"])
            if repeat == 0:
                bare_run(tmp / "warmup", flow_dir / "data", 10)  # first-run costs (imports, allocator) off the books
            bare_rates.append(bare_run(tmp / f"bare{repeat}", flow_dir / "data", args.steps))
            print(f"repeat {repeat}: bare {bare_rates[-1]:.2f} steps/s, flow {flow_rates[-1]:.2f} steps/s "
                  f"(flow wall {flow_walls[-1]:.1f} s for {args.steps} steps)")
        bare, flow = max(bare_rates), max(flow_rates)
        print(f"\ntraining throughput, best of {args.repeats}: bare {bare:.2f} steps/s, flow {flow:.2f} steps/s")
        print(f"flow / bare = {flow / bare:.3f}  (goal ≥ 0.97)")
        print(f"flow fixed cost outside training: {min(flow_walls) - args.steps / flow:.1f} s per run")
        return 0


if __name__ == "__main__":
    sys.exit(main())
