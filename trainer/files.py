"""Writes that survive a crash: a temp file beside the target, fsync, rename, fsync the folder; and what a
refused write means (full, read-only, no permission)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path

from fidel_tts.trainer.errors import FidelError


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_problem(folder: Path, exc: BaseException) -> str | None:
    """What a failed write says when the disk refused it (full, read-only, no permission), else None."""
    code = getattr(exc, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({os.strerror(code)})"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    # torch.save hides ENOSPC behind "enforce fail at inline_container.cc ... unexpected pos"
    if code in (errno.ENOSPC, errno.EDQUOT) or (isinstance(exc, RuntimeError) and free is not None and free < 1 << 20):
        return f"no space left on device ({(free or 0) / 2**20:.1f} MiB free)"
    return None


def create_temp(path: Path) -> tuple[int, str]:
    """A new hidden temp file beside path (.NAME.XXXXXXXX.tmp), opened for writing. Created with mode 0666 so the
    umask applies, as to any other file the user writes: mkstemp's 0600 would survive the rename."""
    while True:
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temp file in the same folder, fsync, rename, fsync the folder. A disk that refuses the
    write (full, read-only) is a FidelError saying so; the temp file goes, whatever was there stays."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp(path)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        problem = disk_problem(path.parent, exc)  # before the temp file goes: a full disk is still full
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if problem:
            raise FidelError(path, f"cannot write: {problem}") from None
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, lambda h: h.write(json.dumps(data, indent=2, sort_keys=True).encode()))
