"""The one pass/fail record: every gate, tokenizer check and verdict line is a Check, printed one way."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Check:
    name: str
    passed: bool
    value: str
    reason: str = ""
    advisory: bool = False  # reported, but a FAIL does not fail the run

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return ("PASS" if self.passed else "FAIL") + (" (advisory)" if self.advisory else "")

    def line(self) -> str:
        return f"{self.label()} {self.name}: {self.value}" + (f" ({self.reason})" if self.reason else "")


def print_report(checks: list[Check], indent: str = "") -> None:
    for check in checks:
        print(f"{indent}{check.line()}")
