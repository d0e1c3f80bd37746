"""`fidel train` (the training loop directly, no Prefect; community train_gpt_v2.py flags) and `fidel options`."""

from __future__ import annotations

import os
from pathlib import Path

from fidel_tts.trainer.errors import EXIT_FAILED, EXIT_PREEMPTED, FidelError
from fidel_tts.trainer.lock import AlreadyRunning, OutputDirLock
from fidel_tts.trainer.options import add_flags, from_args, markdown_table
from fidel_tts.trainer.training.options import LaunchOptions, TrainConfig


def add_commands(sub) -> None:
    add_train_parser(sub)
    options = sub.add_parser("options", help="print every option (flag, run.yaml key, default, range) as a table")
    options.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's; the default)")
    options.set_defaults(func=cmd_options)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train directly, no Prefect (community train_gpt_v2.py flags)")
    add_flags(p, TrainConfig)
    add_flags(p, LaunchOptions)
    p.set_defaults(func=cmd_train)


def without_option(argv: list[str], name: str) -> list[str]:
    """argv minus `name VALUE` and `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip or arg == name or arg.startswith(f"{name}="):
            skip = arg == name
            continue
        out.append(arg)
    return out


def cmd_train(args) -> int:
    from fidel_tts.trainer.checkpoints.experimental import community_resume
    from fidel_tts.trainer.training.hooks import TrainHooks
    from fidel_tts.trainer.training.trainer import train

    tc = TrainConfig(**from_args(TrainConfig, args))
    launch = LaunchOptions(**from_args(LaunchOptions, args))
    if launch.distributed and "WORLD_SIZE" not in os.environ:
        from fidel_tts.trainer.training.distributed import exit_process, launch_torchrun

        argv = args.argv  # the workers run the same command, less the launch flags
        for name in ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint"):
            argv = without_option(argv, name)
        exit_process(launch_torchrun(launch.nproc, argv, launch.nnodes, launch.node_rank, launch.rdzv_endpoint))

    def line(metrics: dict) -> str:
        return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))

    def show_validation(rows):
        for step, metrics in rows:
            if any(k.startswith("val_") for k in metrics):
                print(f"validation at step {step}: {line(metrics)}", flush=True)

    lock = OutputDirLock(tc.output_dir)

    def claim(out: Path) -> None:
        try:
            lock.acquire()
        except AlreadyRunning as busy:
            who = busy.holder.describe() if busy.holder else "holder unknown"
            raise FidelError(out, f"in use by another fidel ({who}): wait for it, or choose another --output-dir") \
                from None

    hooks = TrainHooks(
        on_claim=claim,
        on_progress=lambda step, total, metrics: print(f"step {step}/{total}: {line(metrics)}", flush=True),
        on_commit=show_validation,
        on_checkpoint=lambda path, sidecar: print(f"saved {path} (step {sidecar['step']})", flush=True),
        on_foreign_resume=community_resume)
    try:
        result = train(tc, hooks)
    finally:
        lock.release()
    if os.environ.get("RANK", "0") != "0":
        return 0 if result.status == "completed" else EXIT_PREEMPTED if result.status == "preempted" else EXIT_FAILED
    print(f"{result.status} at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint}"
          + (f" ({result.reason})" if result.reason else ""))
    if result.status == "preempted":
        return EXIT_PREEMPTED
    return 0 if result.status == "completed" else EXIT_FAILED


def cmd_options(args) -> int:
    from fidel_tts.tasks.spec import RunSpec

    print(markdown_table(TrainConfig, LaunchOptions, RunSpec), end="")
    return 0
