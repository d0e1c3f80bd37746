"""Training progress: a bar on a terminal, plain lines anywhere else (a log file, a Prefect worker, CI).

A bar written to a file or a pipe becomes thousands of carriage-return lines. Off a terminal, Progress writes
one plain line at most every `every_s` seconds, and at the last step, through `log`: a callable taking one
line (print to the stream by default; a flow can pass its run logger's `info`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def loss_text(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('train_').replace('_', ' ')} {metrics[k]:.3f}"
                     for k in ("train_text_loss", "train_mel_loss") if k in metrics)


class Progress:
    def __init__(self, label: str, total: int, initial: int = 0, stream=None,
                 log: Callable[[str], None] | None = None, every_s: float = 30.0, tty: bool | None = None,
                 unit: str = "step"):
        self.label, self.total, self.every_s, self.unit = label, total, every_s, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log = log or (lambda line: print(line, file=self.stream, flush=True))
        self.bar = None
        self.last_line = time.monotonic()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit=unit, file=self.stream)
        else:  # where it starts: a log reader sees the loop begin, not only its first 30 s
            self.log(f"{label}: {unit} {initial}/{total} ({100.0 * initial / max(1, total):.0f}%)")

    def update(self, step: int, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(loss_text(metrics))
            return
        now = time.monotonic()
        if step >= self.total or now - self.last_line >= self.every_s:
            self.last_line = now
            share = 100.0 * step / max(1, self.total)
            self.log(f"{self.label}: {self.unit} {step}/{self.total} ({share:.0f}%) {loss_text(metrics)}".rstrip())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def tracked(items: Iterable[T], label: str, total: int, enabled: bool = True, unit: str = "item") -> Iterator[T]:
    """items, counted by a Progress on stderr: a bar on a terminal, a plain line at most every 30 s otherwise."""
    if not enabled:
        yield from items
        return
    progress = Progress(label, total, unit=unit)
    for done, item in enumerate(items, 1):
        yield item
        progress.update(done, {})
    progress.close()
