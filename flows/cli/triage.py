"""`fidel triage` (fresh, resume, experimental or refuse, with the evidence) and `fidel experimental-resume`
(the guide's Option B behind the text-loss gate)."""

from __future__ import annotations

import json
from pathlib import Path

from fidel_tts.trainer.errors import EXIT_HOSTILE, EXIT_QUARANTINED, EXIT_REFUSED
from fidel_tts.trainer.options import add_flags, from_args
from fidel_tts.trainer.training.options import TrainConfig


def print_decision(decision, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    for column in ("checkpoint", "kind", "step", "finding", "decision", "evidence"):
        table.add_column(column, overflow="fold")
    for c in decision.candidates:
        table.add_row(Path(c.path).name, c.kind, str(c.step), c.finding or ("valid" if c.valid else "invalid"),
                      c.decision, c.detail)
    console = Console(width=160)
    if decision.candidates:
        console.print(table)
    console.print(f"decision: [bold]{decision.action}[/bold]: {decision.reason}")


def cmd_triage(args) -> int:
    from fidel_tts.trainer.checkpoints.triage import Reference, TriagePolicy, triage_path

    policy = TriagePolicy(args.policy, args.fresh_below, args.resume_from, args.definitely_from, args.warmup_steps,
                          args.text_loss_threshold)
    ref = Reference.load(args.base, args.tokenizer) if args.base else None
    decision = triage_path(args.path, ref=ref, policy=policy)
    if args.out:
        Path(args.out).write_text(decision.to_json(), encoding="utf-8")
    if args.json:
        print(decision.to_json())
    else:
        print_decision(decision, f"triage: {args.path}")
    return {None: 0, "refuse": EXIT_REFUSED, "quarantine": EXIT_QUARANTINED, "hostile": EXIT_HOSTILE}[decision.refusal]


def cmd_experimental_resume(args) -> int:
    from fidel_tts.tasks.gates import gate_tagger
    from fidel_tts.trainer.checkpoints.experimental import experimental_resume
    from fidel_tts.trainer.training.hooks import TrainHooks

    tc = TrainConfig(**from_args(TrainConfig, args))
    tracker = None
    if args.tracking_uri:
        from fidel_tts.tasks.tracking import open_run

        tracker = open_run(args.output_dir, args.tracking_uri)
        tracker.set_tags({"triage.decision": "experimental", "resume.from": str(args.checkpoint)})
    hooks = TrainHooks(on_checkpoint=lambda path, sidecar: print(f"saved {path} (step {sidecar['step']})"))
    run = experimental_resume(args.checkpoint, tc, args.text_loss_threshold, args.within_steps, hooks,
                              gate_tagger(tracker), keep_base_rows=args.keep_base_rows)
    if tracker is not None:
        tracker.set_tags({"train.status": run.result.status, "train.step": run.result.step})
        tracker.finish("FAILED" if run.result.status == "failed" else "FINISHED")
    print(json.dumps({"backup": str(run.backup.path), "backup_sha256": run.backup.sha256, "repair": run.repair,
                      "imported": str(run.imported), "text_loss_gate": run.gate, "status": run.result.status,
                      "step": run.result.step, "reason": run.result.reason}, indent=2, ensure_ascii=False))
    return 0 if run.result.status == "completed" else 1


RESUME_OPTIONS = ("train_manifests", "val_manifests", "tokenizer", "config", "base_checkpoint", "output_dir",
                  "max_steps", "batch_size", "learning_rate", "warmup_steps", "val_interval", "save_interval",
                  "device", "seed")
RESUME_REQUIRED = ("tokenizer", "config", "base_checkpoint", "output_dir", "max_steps")


def add_commands(sub) -> None:
    t = sub.add_parser("triage", help="inspect checkpoints (fidel or community): fresh, resume, experimental or "
                                      "refuse, with the evidence",
                       epilog="exit status: 0 fresh, resume or experimental; 3 refused (incompatible); "
                              "4 quarantined (corrupt or truncated); 5 hostile (a pickle that asks for code); "
                              "2 a bad flag or --base/--tokenizer")
    t.add_argument("path", help="a checkpoint file, a fidel output dir or a community trainer's output dir")
    t.add_argument("--base", help="the base gpt.pth: judge base-row drift, config and moments against it")
    t.add_argument("--tokenizer", help="the extended bpe.model: vocabulary rows must be its pieces + 1")
    t.add_argument("--policy", default="recommended",
                   choices=["recommended", "experimental", "force-fresh", "force-resume"])
    t.add_argument("--fresh-below", type=int, default=5000, help="a fixed run younger than this starts fresh")
    t.add_argument("--resume-from", type=int, default=20000, help="a fixed run at least this old is resumed")
    t.add_argument("--definitely-from", type=int, default=50000)
    t.add_argument("--warmup-steps", type=int, default=None, help="the community run's warmup (not stored)")
    t.add_argument("--text-loss-threshold", type=float, default=3.0,
                   help="a broken run later resumed with the hooks continues only below this text loss (Option B)")
    t.add_argument("--json", action="store_true", help="print the decision as JSON instead of the table")
    t.add_argument("--out", help="also write the JSON decision here")
    t.set_defaults(func=cmd_triage)

    e = sub.add_parser("experimental-resume", help="back up a broken community checkpoint, restore its base rows, "
                                                   "zero their Adam moments and resume into a new dir behind the "
                                                   "text-loss gate")
    e.add_argument("checkpoint")
    add_flags(e, TrainConfig, only=RESUME_OPTIONS, required=RESUME_REQUIRED)
    e.add_argument("--text-loss-threshold", type=float, default=3.0)
    e.add_argument("--within-steps", type=int, default=5000, help="steps after the resume to get below it")
    e.add_argument("--keep-base-rows", action="store_true",
                   help="keep base rows as the run left them (a fixed run's weight-decay shrink) instead of restoring "
                        "them from the base; they become the base of the new run, written to OUTPUT_DIR/base/gpt.pth")
    e.add_argument("--tracking-uri", default=None, help="MLflow store to tag the gate results on (optional)")
    e.set_defaults(func=cmd_experimental_resume)
