"""Stage 3: checkpoint triage: fresh, resume, or refuse."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.report import StageFailed, logger, publish
from tasks.spec import RunSpec
from tasks.tracking import Tracker
from trainer.triage import triage_output_dir


@task(name="checkpoint-triage", cache_policy=NO_CACHE)
def checkpoint_triage(spec: RunSpec, tracker: Tracker | None) -> dict:
    decision = triage_output_dir(spec.output_dir)
    publish("triage", decision.to_markdown(), decision.to_dict(), spec.output_dir, tracker)
    logger().info("triage: %s (%s)", decision.action, decision.reason)
    if tracker is not None:
        tracker.set_tags({"triage.decision": decision.action, "triage.reason": decision.reason[:4000]})
    if decision.action == "refuse":
        raise StageFailed(f"triage: {decision.reason}")
    return decision.to_dict()
