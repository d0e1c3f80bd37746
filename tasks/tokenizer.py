"""Stage 2: tokenizer verification against the base tokenizer, on the checked target texts."""

from __future__ import annotations

from fidel_tts.tasks.report import StageFailed, logger, publish
from fidel_tts.tasks.spec import RunSpec
from fidel_tts.tasks.tracking import Tracker
from fidel_tts.trainer.model.weights import torch_load, upstream_keys_of
from fidel_tts.trainer.text.tokenizer import load_tokenizer, verify_tokenizer
from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="tokenizer-verification", cache_policy=NO_CACHE)
def tokenizer_verification(spec: RunSpec, texts: list[str], tracker: Tracker | None) -> dict:
    base_rows = upstream_keys_of(torch_load(spec.base_checkpoint), spec.base_checkpoint)["text_embedding.weight"].shape[0]
    base_size = load_tokenizer(spec.base_tokenizer).get_piece_size()
    report = verify_tokenizer(spec.tokenizer, spec.base_tokenizer, texts)
    markdown = report.to_markdown()
    rows_ok = base_rows == base_size + 1
    markdown += (f"\n\nBase checkpoint text rows {base_rows} vs base tokenizer {base_size} pieces + 1: "
                 f"{'PASS' if rows_ok else 'FAIL'}\n")
    publish("tokenizer", markdown, {**report.to_dict(), "base_rows_match": rows_ok}, spec.output_dir, tracker,
            details=report.details_markdown())
    for line in report.to_text().splitlines():
        logger().info(line)
    failed = [line.name for line in report.lines if not line.passed]
    if tracker is not None:
        tracker.set_tags({"tokenizer.verified": "PASS" if report.passed and rows_ok else "FAIL"})
    if not rows_ok:
        raise StageFailed(f"tokenizer: base checkpoint has {base_rows} text rows, base tokenizer {base_size} pieces "
                          f"(want rows = pieces + 1)")
    if failed:
        raise StageFailed(f"tokenizer verification failed: {', '.join(failed)}")
    return report.to_dict()
