"""One writer per output dir: an OS file lock (fcntl.flock), released by the kernel when its process dies.

Prefect concurrency slots leak after kill -9; a flock cannot. The lock file also says who holds it (pid, host,
flow run), and whether the last holder let go cleanly, so the next holder knows a SIGKILLed predecessor.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_FILE = ".fidel.lock"


@dataclass
class Holder:
    pid: int
    host: str
    flow_run_id: str | None
    acquired_at: float
    released: bool = False

    def describe(self) -> str:
        return f"pid {self.pid}, host {self.host}" + (f", flow run {self.flow_run_id}" if self.flow_run_id else "")


class AlreadyRunning(Exception):
    """Another process holds the output dir's lock."""

    def __init__(self, path: Path, holder: Holder | None):
        self.path, self.holder = path, holder
        who = holder.describe() if holder else "holder unknown"
        super().__init__(f"already running ({who}): {path} is locked")


def read_holder(path: Path) -> Holder | None:
    """The record in a lock file; None when there is none yet or it is half written."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Holder(**raw)
    except (OSError, ValueError, TypeError):
        return None


class OutputDirLock:
    """`with OutputDirLock(dir, flow_run_id) as lock:`; raises AlreadyRunning at once when it is held."""

    def __init__(self, output_dir: str | Path, flow_run_id: str | None = None):
        self.path = Path(output_dir) / LOCK_FILE
        self.flow_run_id = flow_run_id
        self.fd: int | None = None
        self.previous: Holder | None = None  # the last holder, as it left the file
        self.holder: Holder | None = None

    def acquire(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(self.path, read_holder(self.path)) from None
        self.fd = fd
        self.previous = read_holder(self.path)
        self.holder = Holder(os.getpid(), socket.gethostname(), self.flow_run_id, time.time())
        self.write(self.holder)
        return self

    def write(self, holder: Holder) -> None:
        data = json.dumps(asdict(holder)).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.holder.released = True
            self.write(self.holder)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    @property
    def predecessor_died(self) -> bool:
        """The last holder never let go: its process was killed (or its machine lost) while holding the lock."""
        return self.previous is not None and not self.previous.released

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
