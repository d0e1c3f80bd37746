"""This process: its place among the ranks (Dist), its device, and stop requests from signals (StopRequest).
The floor that training, data preparation and the CLI all stand on."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


class SignalScope:
    """Handlers for SIGTERM and SIGINT while the block runs (signals reach the main thread only), the previous
    ones after. The first signal goes to `on_signal`; a second one exits at once."""

    def __init__(self):
        self.signal: int | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum
        self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        pass

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class StopRequest(SignalScope):
    """In a loop that can save: the first SIGTERM/SIGINT asks for a stop after the current step."""

    @property
    def requested(self) -> bool:
        return self.signal is not None



def resolve_device(name: str, env: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    return device


def device_problem(name: str) -> str | None:
    if name == "auto":
        return None
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return f"not a torch device (auto, cpu, cuda, cuda:N), got {name!r}"
    return None


class Stopped(BaseException):
    """SIGTERM or SIGINT outside a training loop (which saves first, see StopRequest): the command ends at once,
    resumable. A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class StopOnSignals(SignalScope):
    """A command's handlers outside training: the first SIGTERM/SIGINT raises Stopped in the main thread.
    StopRequest replaces them while a training loop runs and puts them back after."""

    def on_signal(self, signum: int) -> None:
        raise Stopped(signum)
