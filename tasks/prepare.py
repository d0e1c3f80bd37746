"""Optional first stage (a `prepare:` section in run.yaml): audio + transcripts → features → the checked Parquet
dataset in output_dir/data (trainer/data/prepare.py). It takes the place of the data-checks stage, whose checks it
runs on the pairs it builds."""

from __future__ import annotations

import time
from pathlib import Path

from fidel_tts.tasks.data import data_stage_result, publish_report
from fidel_tts.tasks.report import logger
from fidel_tts.tasks.spec import RunSpec
from fidel_tts.tasks.tracking import Tracker
from fidel_tts.trainer.data.checks import CheckSettings
from fidel_tts.trainer.data.prepare import PrepareSettings, prepare
from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="prepare", cache_policy=NO_CACHE)
def prepared_data(spec: RunSpec, tracker: Tracker | None) -> dict:
    """The data stage's result, or {"status": "preempted", ...} when a signal stopped it after a batch."""
    log = logger()
    output_dir = Path(spec.output_dir)
    data_dir = output_dir / "data"
    settings = PrepareSettings(**spec.prepare)
    checks = CheckSettings(max_bad_rows=spec.max_bad_rows, min_script_share=spec.min_script_share,
                           cond_dtype=settings.cond_dtype)
    splits = {"train": list(spec.train_manifests), "val": list(spec.val_manifests)}
    shown = [0.0]

    def progress(done: int, todo: int) -> None:
        if time.monotonic() - shown[0] >= 30 or done == todo:
            shown[0] = time.monotonic()
            log.info("prepare: features of %d/%d clips", done, todo)

    result = prepare(splits, spec.tokenizer, spec.config, data_dir, settings, checks, progress)
    if result.status == "preempted":
        return {"status": "preempted", "clips": result.clips}
    if result.reused:
        log.info("prepared data unchanged in %s (content %s): reusing it", data_dir,
                 result.info["content_sha256"][:16])
    else:
        for d in result.dropped[:10]:
            log.info("%s: utterance %s: %s: %s [dropped before features]", d["where"], d["id"], d["check"],
                     d["detail"])
        log.info("prepare: %d clips through the models in %.1f s, %d dropped before features", result.clips,
                 result.seconds, len(result.dropped))
        publish_report(result.report, result.info, output_dir, tracker)
    if tracker is not None:
        tracker.set_tags({"data.prepared": "true", "data.prepare.dropped": result.info["prepare"]["dropped"]})
    return {"status": "completed", **data_stage_result(result.info, data_dir, tracker)}
