"""The `fidel` command. Heavy imports (torch, Prefect, MLflow) happen inside each subcommand."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainer.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's temporary server waits 20 s by default; a busy 2-core machine needs longer (it starts in ~5-60 s)
STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
os.environ.setdefault(STARTUP_TIMEOUT, "180")



class Parser(argparse.ArgumentParser):
    """A usage mistake ends in one line too, like every other bad input (argparse would print the usage first)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}\n")


def add_train_parser(sub) -> None:
    from trainer.training.options import LaunchOptions, TrainConfig, add_flags

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
    from tasks.lock import AlreadyRunning, OutputDirLock
    from trainer.errors import FidelError
    from trainer.training.options import LaunchOptions, from_args
    from trainer.training.trainer import TrainConfig, TrainHooks, train

    tc = TrainConfig(**from_args(TrainConfig, args))
    launch = LaunchOptions(**from_args(LaunchOptions, args))
    if launch.distributed and "WORLD_SIZE" not in os.environ:
        from trainer.training.distributed import launch_torchrun

        argv = args.argv  # the workers run the same command, less the launch flags
        for name in ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint"):
            argv = without_option(argv, name)
        return launch_torchrun(launch.nproc, argv, launch.nnodes, launch.node_rank, launch.rdzv_endpoint)

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
        on_checkpoint=lambda path, sidecar: print(f"saved {path} (step {sidecar['step']})", flush=True))
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


def prefect_log_to(log_file: Path) -> None:
    """Prefect's records, tracebacks included, go to log_file; the terminal keeps one line per record, without
    traceback or the temporary server's start and stop notes, so fidel's own line stays the last one."""
    import logging

    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()  # Prefect's console handler first: with another handler on the root, Prefect adds none

    class WithoutTraceback(logging.Formatter):
        def __init__(self, inner: logging.Formatter | None):
            super().__init__()
            self.inner = inner or logging.Formatter()

        def format(self, record):
            saved = record.exc_info, record.exc_text, record.stack_info
            record.exc_info = record.exc_text = record.stack_info = None
            try:
                return self.inner.format(record)
            finally:
                record.exc_info, record.exc_text, record.stack_info = saved

    def not_server_note(record) -> bool:
        return not (record.name == "prefect" and "temporary server" in str(record.msg))

    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setFormatter(WithoutTraceback(handler.formatter))
            handler.addFilter(not_server_note)
    root.addHandler(to_file)


def cmd_run(args) -> int:
    from tasks.spec import load_run_spec
    from trainer.training.trainer import check_output_dir

    spec = load_run_spec(args.config)  # every setting and input checked before Prefect, MLflow or any stage starts
    spec.check_inputs()
    check_output_dir(Path(spec.output_dir))
    prefect_log_to(Path(spec.output_dir) / "logs" / "prefect.log")
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
    """Every gate, advisory ones marked, and the way to the MLflow run."""
    from tasks.tracking import Tracker
    from trainer.report import Check, print_report

    print(f"\nMLflow run {summary['mlflow_run_id']} (experiment {summary['experiment_id']})")
    print_report([Check(**gate) for gate in summary["gates"]], indent="  ")
    print(f"exported model: {summary['export_dir']}")
    tracker = Tracker(summary["tracking_uri"], summary["mlflow_run_id"], summary["experiment_id"], resumed=False)
    print(tracker.how_to_view())


def cmd_options(args) -> int:
    from tasks.spec import RunSpec
    from trainer.training.options import LaunchOptions, TrainConfig, markdown_table

    print(markdown_table(TrainConfig, LaunchOptions, RunSpec), end="")
    return 0


def cmd_export(args) -> int:
    from trainer.export import export_model

    exported = export_model(args.checkpoint, args.out, fp16=args.fp16, base_checkpoint=args.base_checkpoint)
    print(json.dumps(exported.record, indent=2))
    return 0


def cmd_demo(args) -> int:
    from flows.demo import run_demo

    return run_demo(Path(args.root), run_name=args.run_name, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fidel", description=__doc__)
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

    options = sub.add_parser("options", help="print every option (flag, run.yaml key, default, range) as a table")
    options.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's; the default)")
    options.set_defaults(func=cmd_options)

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
        if isinstance(exc, Preempted):
            print(f"preempted: {exc}", file=sys.stderr)
            return EXIT_PREEMPTED
        if isinstance(exc, StageFailed):
            print(f"failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if "Timed out while attempting to connect to ephemeral Prefect API server" in str(exc):
            print(f"error: Prefect's temporary server did not start within {os.environ[STARTUP_TIMEOUT]} s: raise "
                  f"{STARTUP_TIMEOUT}, or set PREFECT_API_URL to a running server", file=sys.stderr)
            return EXIT_FAILED
        return unexpected(exc)


def unexpected(exc: BaseException) -> int:
    """A disk that refuses a write is the user's to fix (exit 2); anything else is fidel's fault (exit 1). Either
    way one line: the traceback goes to a file that the line names."""
    import tempfile
    import traceback

    from trainer.training.checkpoint import disk_problem

    folder = Path(getattr(exc, "filename", None) or ".").parent
    problem = disk_problem(folder, exc) if isinstance(exc, OSError) else None
    if problem:
        print(f"error: {getattr(exc, 'filename', None) or folder}: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    fd, path = tempfile.mkstemp(prefix="fidel-traceback-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        traceback.print_exception(exc, file=handle)
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    print(f"error: unexpected {type(exc).__name__}: {first} (traceback in {path})", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
