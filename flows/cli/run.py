"""`fidel run` (the fine-tune flow from a run.yaml) and `fidel demo` (the demo corpus, then the same flow)."""

from __future__ import annotations

import logging
from pathlib import Path


def add_commands(sub) -> None:
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


def cmd_run(args) -> int:
    from fidel_tts.tasks.spec import load_run_spec
    from fidel_tts.trainer.training.build import check_output_dir

    spec = load_run_spec(args.config)  # every setting and input checked before Prefect, MLflow or any stage starts
    spec.check_inputs()
    check_output_dir(Path(spec.output_dir))
    prefect_log_to(Path(spec.output_dir) / "logs" / "prefect.log")
    from fidel_tts.flows.finetune import finetune, print_summary
    from fidel_tts.flows.server import prefect_api

    with prefect_api():
        summary = finetune(run_config=args.config, show_progress=not args.no_progress)
    if summary["status"] == "already_running":
        print(summary["message"])
        return 0
    if summary["status"] == "already_finished":
        print(f"lineage in {summary['output_dir']} already finished: nothing to do")
    print_summary(summary)
    return 0


def prefect_log_to(log_file: Path) -> None:
    """Prefect's records, tracebacks included, go to log_file; the terminal keeps one line per record, without
    traceback or the temporary server's start and stop notes, so fidel's own line stays the last one."""
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


def cmd_demo(args) -> int:
    from fidel_tts.flows.demo.flow import run_demo
    from fidel_tts.flows.server import prefect_api

    with prefect_api():
        return run_demo(Path(args.root), run_name=args.run_name, quick=args.quick)
