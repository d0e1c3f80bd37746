"""`fidel data check`, `fidel data build`, `fidel data pair` and `fidel prepare`.

flows/cli/__init__.py calls add_commands(sub) with the object returned by ArgumentParser().add_subparsers().
Exit codes: 0 passed, 1 the checks found a fatal problem, 2 a bad input (one line naming the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from fidel_tts.flows.cli.train import without_option
from fidel_tts.trainer.errors import EXIT_PREEMPTED, FidelError
from fidel_tts.trainer.options import add_flags, from_args


def settings_of(args: argparse.Namespace):
    from fidel_tts.trainer.data.checks import CheckSettings

    if not 0.0 <= args.max_bad_rows <= 1.0:
        raise FidelError(None, f"--max-bad-rows is a fraction in 0..1, got {args.max_bad_rows}")
    share = None if args.min_script_share < 0 else args.min_script_share
    return CheckSettings(max_bad_rows=args.max_bad_rows, min_script_share=share,
                         cond_dtype=getattr(args, "cond_dtype", "float16"))


def splits_of(args: argparse.Namespace) -> dict[str, list[str]]:
    splits = {"train": args.train}
    if args.val:
        splits["val"] = args.val
    return splits


def print_data_report(report, out: Path, written: list[Path], shown: int) -> None:
    for line in report.summary_lines():
        print(line)
    for finding in report.findings[:shown]:
        print(f"  {finding.text()}")
    if len(report.findings) > shown:
        print(f"  … {len(report.findings) - shown} more in {out / 'data_problems.parquet'}")
    print(f"report: {', '.join(str(p) for p in written)}")


def run_check(args: argparse.Namespace) -> int:
    from fidel_tts.trainer.data.checks import check_manifests, write_report_files

    started = time.monotonic()
    report = check_manifests(splits_of(args), args.tokenizer, args.config, settings_of(args))
    written = write_report_files(report, args.out)
    print_data_report(report, args.out, written, args.show)
    pairs = sum(s.pairs for s in report.splits.values())
    print(f"{'PASSED' if report.passed else 'FAILED'}: {pairs} pairs checked in {time.monotonic() - started:.1f} s")
    return 0 if report.passed else 1


def run_build(args: argparse.Namespace) -> int:
    from fidel_tts.trainer.data.checks import write_report_files
    from fidel_tts.trainer.data.parquet import build_dataset

    started = time.monotonic()
    report, info = build_dataset(splits_of(args), args.tokenizer, args.config, args.out, settings_of(args))
    written = write_report_files(report, args.out / "report")
    print_data_report(report, args.out / "report", written, args.show)
    if info is None:
        print(f"FAILED: nothing built ({time.monotonic() - started:.1f} s)")
        return 1
    for split, record in info["splits"].items():
        print(f"{split}: {record['rows']} rows → {record['path']} ({record['row_groups']} row group(s), content "
              f"{record['content_sha256'][:16]})")
    print(f"BUILT in {time.monotonic() - started:.1f} s: conditioning {info['cond_dtype']}, codes {info['codes_dtype']}, "
          f"content sha256 {info['content_sha256']}")
    return 0


def run_pair(args: argparse.Namespace) -> int:
    from fidel_tts.trainer.data.manifest import pair_manifest

    summary = pair_manifest(args.manifest, args.out, args.pairs_per_target, args.seed)
    print(f"{summary.pairs} pairs from {summary.utterances} utterances of {summary.speakers} speakers → {summary.out}")
    if summary.skipped_speakers:
        print(f"skipped (fewer than two utterances): {', '.join(summary.skipped_speakers[:20])}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from fidel_tts.trainer.training.distributed import exit_process, launch_torchrun

        exit_process(launch_torchrun(args.nproc, without_option(args.argv, "--nproc")))
    from fidel_tts.trainer.data.prepare import PrepareSettings, prepare

    settings = PrepareSettings(**from_args(PrepareSettings, args))
    # the parsed flag is raw argparse output (a list); the settings hold the checked value
    checks = dataclasses.replace(settings_of(args), cond_dtype=settings.cond_dtype)
    for line in settings.found_models()[1]:
        print(line)
    started, shown = time.monotonic(), [0.0]

    def progress(done: int, todo: int) -> None:
        now = time.monotonic()
        if now - shown[0] >= 10 or done == todo:
            shown[0] = now
            print(f"features: {done}/{todo} clips, {done / max(now - started, 1e-9):.2f} clips/s", flush=True)

    result = prepare(splits_of(args), args.tokenizer, args.config, args.out, settings, checks, progress)
    if result.status == "preempted":
        print(f"preempted after {result.clips} clips: finished shards are kept; run the same command to continue")
        return EXIT_PREEMPTED
    if result.status == "shards_done":
        return 0
    if result.reused:
        print(f"already prepared from these inputs: {args.out / 'dataset.json'} (content "
              f"{result.info['content_sha256'][:16]})")
        return 0
    for d in result.dropped[:args.show]:
        print(f"  {d['where']}: utterance {d['id']}: {d['check']}: {d['detail']} [dropped before features]")
    if len(result.dropped) > args.show:
        print(f"  … {len(result.dropped) - args.show} more dropped utterances "
              "(all in dataset.json: prepare.dropped_rows)")
    from fidel_tts.trainer.data.checks import write_report_files

    written = write_report_files(result.report, args.out / "report")
    print_data_report(result.report, args.out / "report", written, args.show)
    if result.info is None:
        print(f"FAILED: nothing built ({time.monotonic() - started:.1f} s)")
        return 1
    print(f"PREPARED in {time.monotonic() - started:.1f} s: {result.clips} clips through the models, "
          f"{len(result.dropped)} dropped before features; content sha256 {result.info['content_sha256']}")
    return 0


def add_prepare_command(subparsers) -> None:
    from fidel_tts.trainer.data.prepare import PrepareSettings

    p = subparsers.add_parser("prepare", help="audio + transcripts → features → the paired Parquet dataset "
                                              "training reads (upstream's w2v-BERT, codec and conditioning)")
    p.add_argument("--train", nargs="+", action="extend", required=True, metavar="MANIFEST[::lang]",
                   help="utterance manifest(s), JSONL or CSV with id, text, audio, speaker (language)")
    p.add_argument("--val", nargs="+", action="extend", default=[], metavar="MANIFEST[::lang]")
    p.add_argument("--tokenizer", type=Path, required=True, help="the verified (extended) sentencepiece model")
    p.add_argument("--config", type=Path, required=True, help="IndexTTS2 config.yaml that training uses")
    p.add_argument("--out", type=Path, required=True, help="dataset folder: train.parquet, val.parquet, dataset.json, "
                                                           "shards/ (resumable), report/")
    add_flags(p, PrepareSettings)
    p.add_argument("--nproc", type=int, default=1, help="processes (one per GPU) via torchrun, sharded by id")
    p.add_argument("--max-bad-rows", type=float, default=0.05, help="fraction of dropped rows that is still fine")
    p.add_argument("--min-script-share", type=float, default=0.5,
                   help="share of Ethiopic letters a target-language text needs (negative: no script check)")
    p.add_argument("--show", type=int, default=20, help="row-level findings to print")
    p.set_defaults(func=run_prepare)


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", nargs="+", action="extend", required=True, metavar="MANIFEST[::lang]",
                   help="paired JSONL manifest(s) of the training split; `::am` sets the language of its rows")
    p.add_argument("--val", nargs="+", action="extend", default=[], metavar="MANIFEST[::lang]",
                   help="validation manifest(s); also enables the train/val leakage check")
    p.add_argument("--tokenizer", type=Path, required=True, help="the verified (extended) sentencepiece model")
    p.add_argument("--config", type=Path, required=True, help="IndexTTS2 config.yaml of the base")
    p.add_argument("--max-bad-rows", type=float, default=0.05, help="fraction of dropped rows that is still fine")
    p.add_argument("--min-script-share", type=float, default=0.5,
                   help="share of Ethiopic letters a target-language text needs (negative: no script check)")
    p.add_argument("--show", type=int, default=20, help="row-level findings to print")


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="check paired manifests; build the Parquet dataset training reads")
    commands = data.add_subparsers(dest="data_command", required=True)

    check = commands.add_parser("check", help="run every data check and write the report (nothing else)")
    add_check_arguments(check)
    check.add_argument("--out", type=Path, default=Path("data_check"),
                       help="report folder: data_check.md/.json, data_problems.parquet, histograms")
    check.set_defaults(func=run_check)

    build = commands.add_parser("build", help="check, then write the kept pairs as a Parquet dataset")
    add_check_arguments(build)
    build.add_argument("--out", type=Path, required=True, help="dataset folder: train.parquet, val.parquet, "
                                                               "dataset.json, report/")
    build.add_argument("--cond-dtype", choices=["float16", "float32"], default="float16",
                       help="storage of conditioning and emotion vectors (recorded in the dataset)")
    build.set_defaults(func=run_build)

    pair = commands.add_parser("pair", help="pair an unpaired (per-utterance) manifest into prompt/target pairs")
    pair.add_argument("--manifest", type=Path, required=True, help="unpaired JSONL: text_ids_path, codes_path, ...")
    pair.add_argument("--out", type=Path, required=True, help="the paired manifest to write (must not exist)")
    pair.add_argument("--pairs-per-target", type=int, default=2)
    pair.add_argument("--seed", type=int, default=0)
    pair.set_defaults(func=run_pair)

    add_prepare_command(subparsers)
