"""One exception type for every bad input, so the CLI and the flow can print one clear line."""

from __future__ import annotations

from pathlib import Path


class FidelError(Exception):
    """A user-facing problem with an input: the message is one line naming the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
