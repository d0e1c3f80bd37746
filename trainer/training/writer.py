"""Checkpoints written in the background: the loop is blocked only while the state is copied to CPU memory.

`AsyncCheckpointWriter.submit` copies every tensor of the state into CPU memory (pinned and reused between saves
when the tensors live on a GPU; the copies are queued on the current stream, so the next step's kernels run
after them and the loop does not wait for them), deep-copies the rest (lists and dicts the loop keeps
mutating), and hands the snapshot to one writer thread that calls `save_checkpoint` (atomic: temp file, fsync,
rename). At most one write is in flight: a new submit first waits for the previous one.

What must follow a durable write (pruning, committing metrics, telling the layer above) is the `on_done`
callback. It runs on the thread that calls `poll`, `wait` or `submit`, never on the writer thread, so hooks
that log to MLflow or Prefect run where they always did. A write that failed raises its error there too.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fidel_tts.trainer.training.checkpoint import Saved, save_checkpoint


@dataclass
class SaveTiming:
    step: int
    blocked_s: float  # the loop's time in submit (snapshot, plus any wait for the previous write)
    waited_s: float  # of which waiting for the previous write
    write_s: float = 0.0  # the writer thread's time (filled in when the write finishes)


@dataclass
class _Job:
    folder: Path
    step: int
    state: dict
    sidecar: dict
    on_done: Callable[[Saved], None] | None
    timing: SaveTiming
    ready: torch.cuda.Event | None = None
    result: Saved | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class AsyncCheckpointWriter:
    def __init__(self, background: bool = True):
        self.background = background
        self.timings: list[SaveTiming] = []
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None
        self._pinned: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ snapshot
    def _copy_tensor(self, key: tuple, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.device.type == "cpu":
            return tensor.clone()
        slot = self._pinned.get(key)
        if slot is None or slot.shape != tensor.shape or slot.dtype != tensor.dtype:
            slot = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._pinned[key] = slot
        slot.copy_(tensor, non_blocking=True)
        return slot

    def snapshot(self, obj, key: tuple = ()):
        """A copy of obj that the loop can no longer change: tensors on CPU, containers and values copied."""
        if isinstance(obj, torch.Tensor):
            return self._copy_tensor(key, obj)
        if isinstance(obj, dict):
            return {k: self.snapshot(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [self.snapshot(v, (*key, i)) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return copy.deepcopy(obj)

    # ------------------------------------------------------------------ writing
    def submit(self, folder: Path, step: int, state: dict, sidecar: dict,
               on_done: Callable[[Saved], None] | None = None) -> SaveTiming:
        """Snapshot the state and write it (in the background unless `background` is off)."""
        started = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - started
        on_gpu = any(t.device.type == "cuda" for t in _tensors(state))
        job = _Job(Path(folder), step, self.snapshot(state), self.snapshot(sidecar), on_done,
                   SaveTiming(step, 0.0, waited))
        if on_gpu:
            job.ready = torch.cuda.Event()
            job.ready.record()
        job.timing.blocked_s = time.perf_counter() - started
        self.timings.append(job.timing)
        self._job = job
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(job,), name=f"checkpoint-{step}", daemon=False)
            self._thread.start()
        else:
            self._write(job)
            self.wait()
            job.timing.blocked_s = time.perf_counter() - started
        return job.timing

    @staticmethod
    def _write(job: _Job) -> None:
        started = time.perf_counter()
        try:
            if job.ready is not None:
                job.ready.synchronize()
            job.result = save_checkpoint(job.folder, job.step, job.state, job.sidecar)
        except BaseException as exc:  # handed to the loop's thread by poll/wait
            job.error = exc
        finally:
            job.timing.write_s = time.perf_counter() - started
            job.state = {}
            job.finished.set()

    def _finish(self, job: _Job) -> None:
        self._job, self._thread = None, None
        if job.error is not None:
            raise job.error
        if job.on_done is not None:
            job.on_done(job.result)

    @property
    def in_flight(self) -> bool:
        return self._job is not None and not self._job.finished.is_set()

    def poll(self) -> Saved | None:
        """Run the completion of a finished write, if any; never blocks."""
        job = self._job
        if job is None or not job.finished.is_set():
            return None
        if self._thread is not None:
            self._thread.join()
        self._finish(job)
        return job.result

    def wait(self) -> Saved | None:
        """Block until the write in flight is durable, then run its completion."""
        job = self._job
        if job is None:
            return None
        job.finished.wait()
        if self._thread is not None:
            self._thread.join()
        self._finish(job)
        return job.result


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
