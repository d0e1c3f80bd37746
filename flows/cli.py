"""The `fidel` command. Heavy imports (torch, Prefect, MLflow) happen inside each subcommand."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train directly, no Prefect (community train_gpt_v2.py flags)")
    p.add_argument("--train-manifest", dest="train_manifests", action="append", required=True,
                   help="paired JSONL manifest, optionally PATH::lang; repeat for several")
    p.add_argument("--val-manifest", dest="val_manifests", action="append", required=True)
    p.add_argument("--tokenizer", default="checkpoints/bpe.model", help="the extended sentencepiece model")
    p.add_argument("--config", default="checkpoints/config.yaml", help="IndexTTS2 config.yaml of the base")
    p.add_argument("--base-checkpoint", default="checkpoints/gpt.pth")
    p.add_argument("--output-dir", default="trained_checkpoints")
    p.add_argument("--resume", default="", help="a checkpoint path, or 'auto' for the newest valid one")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="token budget per micro-batch: length-bucketed batches grow while pairs × (longest text + "
                        "longest codes) fits, up to 4 × --batch-size pairs")
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: epochs decide)")
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--new-rows-lr", type=float, default=None, help="learning rate of the new text rows")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--text-loss-weight", type=float, default=0.2)
    p.add_argument("--mel-loss-weight", type=float, default=0.8)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--val-interval", type=int, default=0, help="steps between validations (0: once per epoch)")
    p.add_argument("--save-every", "--save-interval", dest="save_interval", type=int, default=500)
    p.add_argument("--keep-checkpoints", dest="keep_last", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--amp", nargs="?", const="auto", default="off", choices=["off", "auto", "bf16", "fp16"],
                   help="mixed precision on CUDA: bf16 where supported, else fp16 with GradScaler")
    p.add_argument("--init", default="subtoken", choices=["subtoken", "mean", "random"],
                   help="new text rows: mean of transliterated base sub-tokens (base mean where a piece has no "
                        "reading; the default), base mean, or random (community)")
    p.add_argument("--freeze", default="split", choices=["split", "hooks"],
                   help="split: base rows are frozen buffers (default); hooks: the community trainers' gradient "
                        "hooks, for comparison only (weight decay moves base rows)")
    p.add_argument("--duration-control", action="store_true",
                   help="train the duration slot on the target code length (speed_emb(0) with p=0.3)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in backward: less activation memory, more compute")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (dynamic shapes; the first steps pay the compile)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto")
    p.add_argument("--freeze-conditioning", action="store_true",
                   help="accepted for compatibility: fidel never trains the conditioning encoders")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine, via torchrun and DDP")
    p.add_argument("--save-minutes", type=float, default=0.0, help="also save every this many minutes (0: off)")
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
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from trainer.distributed import launch_torchrun

        return launch_torchrun(args.nproc, without_option(args.argv, "--nproc"))
    from trainer.train import EXIT_PREEMPTED, TrainConfig, TrainHooks, train

    tc = TrainConfig(
        train_manifests=args.train_manifests, val_manifests=args.val_manifests, tokenizer=args.tokenizer,
        config=args.config, output_dir=args.output_dir, base_checkpoint=args.base_checkpoint,
        resume=args.resume or None, epochs=args.epochs, max_steps=args.max_steps or None,
        batch_size=args.batch_size, grad_accumulation=args.grad_accumulation, learning_rate=args.learning_rate,
        new_rows_lr=args.new_rows_lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip, text_loss_weight=args.text_loss_weight, mel_loss_weight=args.mel_loss_weight,
        log_interval=args.log_interval, val_interval=args.val_interval, save_interval=args.save_interval,
        keep_last=args.keep_last, save_minutes=args.save_minutes, amp=args.amp, init=args.init, seed=args.seed,
        num_workers=args.num_workers, device=args.device, freeze=args.freeze, duration_control=args.duration_control,
        batch_tokens=args.batch_tokens, activation_checkpointing=args.activation_checkpointing, compile=args.compile)

    def line(metrics: dict) -> str:
        return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))

    def show_validation(rows):
        for step, metrics in rows:
            if any(k.startswith("val_") for k in metrics):
                print(f"validation at step {step}: {line(metrics)}", flush=True)

    hooks = TrainHooks(
        on_progress=lambda step, total, metrics: print(f"step {step}/{total}: {line(metrics)}", flush=True),
        on_commit=show_validation,
        on_checkpoint=lambda path, sidecar: print(f"saved {path} (step {sidecar['step']})", flush=True))
    result = train(tc, hooks)
    if os.environ.get("RANK", "0") != "0":
        return 0 if result.status == "completed" else EXIT_PREEMPTED if result.status == "preempted" else EXIT_FAILED
    print(f"{result.status} at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint}"
          + (f" ({result.reason})" if result.reason else ""))
    if result.status == "preempted":
        return EXIT_PREEMPTED
    return 0 if result.status == "completed" else EXIT_FAILED


def cmd_run(args) -> int:
    from flows.finetune import finetune

    summary = finetune(run_config=args.config, show_progress=not args.no_progress)
    if summary["status"] == "already_running":
        print(summary["message"])
        return 0
    if summary["status"] == "already_finished":
        print(f"lineage in {summary['output_dir']} already finished: nothing to do")
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    print(f"\nMLflow run {summary['mlflow_run_id']} (experiment {summary['experiment_id']})")
    for gate in summary["gates"]:
        print(f"  {'PASS' if gate['passed'] else 'FAIL'} {gate['name']}: {gate['value']}")
    print(f"exported model: {summary['export_dir']}")
    print(f"see it: .venv/bin/mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000, then open "
          f"http://127.0.0.1:5000/#/experiments/{summary['experiment_id']}/runs/{summary['mlflow_run_id']}")


def cmd_export(args) -> int:
    from trainer.export import export_model

    exported = export_model(args.checkpoint, args.out, fp16=args.fp16, base_checkpoint=args.base_checkpoint)
    print(json.dumps(exported.record, indent=2))
    return 0


def cmd_demo(args) -> int:
    from flows.demo import run_demo

    return run_demo(Path(args.root), run_name=args.run_name, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fidel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the small Amharic demo corpus and run the whole flow on it")
    demo.add_argument("--root", default="demo", help="where the corpus, base model and run live")
    demo.add_argument("--run-name", default="finetune",
                      help="the fine-tune's folder under ROOT/runs; a new name starts a new lineage")
    demo.add_argument("--quick", action="store_true", help="a smaller corpus and shorter training (a smoke run)")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the fine-tune flow from a run.yaml")
    run.add_argument("--config", required=True, help="the run file (see README)")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=cmd_run)

    add_train_parser(sub)

    from flows.cli_triage import add_commands as add_triage_commands

    add_triage_commands(sub)  # triage, experimental-resume

    export = sub.add_parser("export", help="write an upstream-loadable gpt.pth, tokenizer and config")
    export.add_argument("checkpoint")
    export.add_argument("--out", required=True)
    export.add_argument("--fp16", action="store_true", help="write float16 tensors (half the size)")
    export.add_argument("--base-checkpoint", default=None,
                        help="the base gpt.pth, if it moved since training (its base rows must hash the same)")
    export.set_defaults(func=cmd_export)

    from flows.cli_tokenizer import add_commands

    add_commands(sub)
    from flows.cli_data import add_commands as add_data_commands

    add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    from trainer.errors import FidelError

    try:
        return args.func(args)
    except FidelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failed flow stage ends in one line: the reason
        from flows.finetune import Preempted
        from tasks.report import StageFailed
        from trainer.train import EXIT_PREEMPTED

        if isinstance(exc, Preempted):
            print(f"preempted: {exc}", file=sys.stderr)
            return EXIT_PREEMPTED
        if isinstance(exc, StageFailed):
            print(f"failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise

if __name__ == "__main__":
    sys.exit(main())
