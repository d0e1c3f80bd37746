"""The `fidel` command. Heavy imports (torch, Prefect, MLflow) happen inside each subcommand."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

from fidel_tts.trainer.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED, FidelError

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's temporary server waits 20 s by default; a busy 2-core machine needs longer (it starts in ~5-60 s)
STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
os.environ.setdefault(STARTUP_TIMEOUT, "180")

from fidel_tts.flows.cli import data, export, run, speak, tokenizer, train, triage  # noqa: E402 - after the Prefect settings


class Parser(argparse.ArgumentParser):
    """A usage mistake ends in one line too, like every other bad input (argparse would print the usage first)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fidel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_commands(sub)  # demo, run
    train.add_commands(sub)  # train, options
    triage.add_commands(sub)  # triage, experimental-resume
    export.add_commands(sub)
    speak.add_commands(sub)
    tokenizer.add_commands(sub)
    data.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except FidelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failed flow stage ends in one line: the reason
        from fidel_tts.flows.finetune import Preempted
        from fidel_tts.tasks.report import StageFailed
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
    from fidel_tts.trainer.files import disk_problem

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

