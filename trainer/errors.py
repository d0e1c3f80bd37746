"""One exception type for every bad input, so the CLI and the flow can print one clear line."""

from __future__ import annotations

from pathlib import Path


class FidelError(Exception):
    """A user-facing problem with an input: the message is one line naming the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


# Every exit status fidel's commands and workers return, in one place.
EXIT_OK = 0
EXIT_FAILED = 1  # the run or a gate failed
EXIT_BAD_INPUT = 2  # a FidelError or a usage mistake: one line, before any work
# `fidel triage` when no candidate is usable: 3 refused (incompatible: vocabulary, config, lineage), 4 quarantined
# (corrupt or truncated), 5 hostile (the pickle asks for code). 0: fresh, resume or experimental.
EXIT_REFUSED, EXIT_QUARANTINED, EXIT_HOSTILE = 3, 4, 5
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and resumable; the same command resumes
