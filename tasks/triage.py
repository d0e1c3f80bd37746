"""Stage 3: checkpoint triage: fresh, resume, or refuse (tagged refuse, quarantine or hostile). Its table goes
to the output dir, Prefect and MLflow."""

from __future__ import annotations

from fidel_tts.tasks.report import StageFailed, logger, publish
from fidel_tts.tasks.spec import RunSpec
from fidel_tts.tasks.tracking import Tracker
from fidel_tts.trainer.checkpoints.triage import Reference, triage_output_dir, triage_path
from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="checkpoint-triage", cache_policy=NO_CACHE)
def checkpoint_triage(spec: RunSpec, tracker: Tracker | None) -> dict:
    """`resume: auto` (or none) triages the output dir; a checkpoint path triages that checkpoint."""
    explicit = spec.resume not in (None, "", "auto")
    ref = Reference.load(spec.base_checkpoint, spec.tokenizer)  # judge candidates against this run's base
    decision = triage_path(spec.resume, ref=ref) if explicit else triage_output_dir(spec.output_dir, ref=ref)
    publish("triage", decision.to_markdown(), decision.to_dict(), spec.output_dir, tracker,
            details=decision.details_markdown())
    logger().info("triage: %s (%s)", decision.action, decision.reason)
    if tracker is not None:
        valid = sum(c.valid for c in decision.candidates)
        tracker.set_tags({"triage.decision": decision.action, "triage.verdict": decision.reason[:4000],
                          "triage.refusal": decision.refusal or "none",
                          "triage.checkpoints": f"{len(decision.candidates)} found, {valid} valid"})
    if decision.action == "refuse":
        raise StageFailed(f"triage: {decision.refusal}: {decision.reason}")
    return decision.to_dict()
