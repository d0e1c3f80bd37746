"""Stage 1: every data check, then the Parquet dataset training reads (output_dir/data)."""

from __future__ import annotations

from pathlib import Path

from fidel_tts.tasks.report import StageFailed, logger, publish
from fidel_tts.tasks.spec import RunSpec
from fidel_tts.tasks.tracking import Tracker
from fidel_tts.trainer.data.checks import CheckSettings, DataReport, write_report_files
from fidel_tts.trainer.data.parquet import (
    DATASET_JSON,
    ParquetPairs,
    build_dataset,
    input_fingerprint,
    read_dataset_info,
)
from prefect import task
from prefect.cache_policies import NO_CACHE


def reusable_build(data_dir: Path, fingerprint: str) -> dict | None:
    """dataset.json of an earlier build from the same manifests, tokenizer, config and settings (a resume)."""
    info = read_dataset_info(data_dir)
    if info is None or info.get("fingerprint") != fingerprint:
        return None
    if not all(Path(record["path"]).is_file() for record in info["splits"].values()):
        return None
    return info


@task(name="data-checks", cache_policy=NO_CACHE)
def data_checks(spec: RunSpec, tracker: Tracker | None) -> dict:
    log = logger()
    output_dir = Path(spec.output_dir)
    data_dir = output_dir / "data"
    splits = {"train": list(spec.train_manifests), "val": list(spec.val_manifests)}
    settings = CheckSettings(max_bad_rows=spec.max_bad_rows, min_script_share=spec.min_script_share)
    info = reusable_build(data_dir, input_fingerprint(splits, spec.tokenizer, spec.config, settings))
    if info is not None:
        log.info("data unchanged since the build in %s (content %s): reusing it", data_dir, info["content_sha256"][:16])
    else:
        report, info = build_dataset(splits, spec.tokenizer, spec.config, data_dir, settings)
        publish_report(report, info, output_dir, tracker)
    return data_stage_result(info, data_dir, tracker)


def publish_report(report: DataReport, info: dict | None, output_dir: Path, tracker: Tracker | None) -> None:
    """The data checks' report as files, artifact and log lines; StageFailed when they failed (info is None)."""
    log = logger()
    data_dir = output_dir / "data"
    written = write_report_files(report, output_dir / "reports", markdown=False)
    publish("data", report.to_markdown(), report.to_dict(), output_dir, tracker, details=report.details_markdown())
    if tracker is not None:
        for path in written:
            tracker.log_artifact(path, "reports")
    for line in report.summary_lines():
        log.info(line)
    for finding in report.findings[:10]:
        log.info(finding.text())
    if info is None:
        if tracker is not None:
            tracker.set_tags({"data.checks": "FAIL"})
        raise StageFailed(f"data checks: {'; '.join(report.fatal)}")
    if tracker is not None:
        tracker.log_artifact(data_dir / DATASET_JSON, "data")


def data_stage_result(info: dict, data_dir: Path, tracker: Tracker | None) -> dict:
    """What the later stages need of a built dataset: its folder, split summary, texts and content hash."""
    splits_info = info["report"]["splits"]
    summary = {name: {"pairs": s["pairs"], "kept": s["kept"], "speakers": s["speakers"]} for name, s in
               splits_info.items()}
    if tracker is not None:
        tracker.set_tags({"data.checks": "PASS", **{f"data.{s}.{k}": v for s, d in summary.items() for k, v in d.items()}})
        tracker.log_params({"data": {"content_sha256": info["content_sha256"], "fingerprint": info["fingerprint"],
                                     "cond_dtype": info["cond_dtype"]}})
        for split, record in info["splits"].items():  # the UI's Datasets: digest = the split's content hash
            tracker.log_dataset(f"{data_dir.parent.name}-{split}", record["content_sha256"], split, record["path"],
                                {"rows": record["rows"], "content_sha256": record["content_sha256"], **summary[split]})
    texts = [t for record in info["splits"].values() for t in ParquetPairs([record["path"]]).column("text")]
    return {"data_dir": str(data_dir), "summary": summary, "texts": texts, "content_sha256": info["content_sha256"]}
