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

from fidel_tts.flows.cli import data, export, run, speak, tokenizer, train, triage  # noqa: E402 - after the Prefect settings
from fidel_tts.trainer.process import StopOnSignals, Stopped  # noqa: E402


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
        with StopOnSignals():
            return args.func(args)
    except FidelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (Stopped, KeyboardInterrupt) as exc:  # a signal outside training: nothing unsaved, the rerun continues
        print(f"preempted: {exc or 'stopped by SIGINT'} before anything was left unsaved; run the same command "
              "again to continue", file=sys.stderr)
        return EXIT_PREEMPTED
    except BaseException as exc:  # a failed flow stage ends in one line: the reason
        return flow_ending(exc)


def flow_ending(exc: BaseException) -> int:
    from fidel_tts.flows.server import ServerDidNotStart
    from fidel_tts.tasks.report import Preempted, StageFailed
    from prefect.exceptions import TerminationSignal

    if isinstance(exc, Preempted):
        print(f"preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    if isinstance(exc, TerminationSignal):
        print("preempted: stopped by SIGTERM; run the same command again to continue", file=sys.stderr)
        return EXIT_PREEMPTED
    if isinstance(exc, StageFailed):
        print(f"failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(exc, ServerDidNotStart):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not isinstance(exc, Exception):
        raise exc
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

