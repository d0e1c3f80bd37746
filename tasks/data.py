"""Stage 1: data checks on the paired manifests."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.report import StageFailed, logger, publish
from tasks.spec import RunSpec
from tasks.tracking import Tracker
from trainer.config import load_gpt_config
from trainer.datacheck import check_manifests, write_clean_manifest
from trainer.tokenizer import encode, load_tokenizer


@task(name="data-checks", cache_policy=NO_CACHE)
def data_checks(spec: RunSpec, tracker: Tracker | None) -> dict:
    sp = load_tokenizer(spec.tokenizer)
    cfg = load_gpt_config(spec.config).with_text_tokens(sp.get_piece_size())
    data_dir = Path(spec.output_dir) / "data"
    summary = {}
    texts = []
    for split, manifests in (("train", spec.train_manifests), ("val", spec.val_manifests)):
        report, kept = check_manifests(manifests, cfg, lambda t: encode(sp, t), spec.max_bad_rows,
                                       spec.min_script_share)
        publish(f"data-{split}", report.to_markdown(), report.to_dict(), spec.output_dir, tracker)
        logger().info("%s: %d of %d pairs kept, %d problems", split, report.kept, report.pairs, len(report.problems))
        if report.fatal:
            raise StageFailed(f"data checks ({split}): {report.fatal}")
        write_clean_manifest(kept, data_dir / f"{split}.checked.jsonl")
        summary[split] = {"pairs": report.pairs, "kept": report.kept, "speakers": report.speakers}
        texts += [p.text for p in kept]
    if tracker is not None:
        tracker.set_tags({f"data.{s}.{k}": v for s, d in summary.items() for k, v in d.items()})
    return {"data_dir": str(data_dir), "summary": summary, "texts": texts}
