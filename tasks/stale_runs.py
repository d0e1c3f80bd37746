"""A SIGKILLed flow run stays "Running" on the Prefect server forever. The run that takes the output dir's
lock next knows better: every other Running flow run that once held the same lock is gone, so it is marked
Crashed.

Runs that held the lock carry the tag `fidel-lock:<hash of the output dir>`. The one exception is the previous
holder when it released the lock cleanly: its final state is being reported right now.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from uuid import UUID

from fidel_tts.trainer.lock import OutputDirLock
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed


def lock_tag(output_dir: str | Path) -> str:
    return "fidel-lock:" + hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]


def claim_and_sweep(lock: OutputDirLock, output_dir: str | Path, flow_run_id: str | UUID | None) -> list[str]:
    """Tag this flow run as the output dir's holder; mark stale Running holders Crashed. Returns their ids."""
    if flow_run_id is None:
        return []
    tag = lock_tag(output_dir)
    me = UUID(str(flow_run_id))
    clean_previous = None if lock.predecessor_died or lock.previous is None else lock.previous.flow_run_id
    marked = []
    with get_client(sync_client=True) as client:
        mine = client.read_flow_run(me)
        if tag not in mine.tags:
            client.update_flow_run(me, tags=[*mine.tags, tag])
        running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[tag]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
        for run in running:
            if run.id == me or str(run.id) == clean_previous:
                continue
            how = ("it held the lock and never released it" if lock.previous and str(run.id) ==
                   lock.previous.flow_run_id else "it held the lock before and no longer does")
            client.set_flow_run_state(run.id, Crashed(message=(
                f"fidel: process gone ({how}); flow run {me} took the lock on {output_dir} "
                f"({lock.holder.describe()})")), force=True)
            marked.append(str(run.id))
    return marked
