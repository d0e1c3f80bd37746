"""Evaluation gates (design.md §6): small pure functions, each a PASS/FAIL with its numbers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class GateResult:
    name: str
    passed: bool
    value: str
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.value}" + (f" ({self.reason})" if self.reason else "")


def base_intact(expected_sha256: str, actual_sha256: str) -> GateResult:
    same = expected_sha256 == actual_sha256
    return GateResult("base_intact", same, f"sha256 {actual_sha256[:16]}…",
                      "" if same else f"expected {expected_sha256[:16]}…")


def finite(losses: dict[str, float]) -> GateResult:
    bad = sorted(k for k, v in losses.items() if not math.isfinite(v))
    return GateResult("finite", not bad, ", ".join(f"{k}={losses[k]:.4g}" for k in sorted(losses)),
                      f"non-finite: {', '.join(bad)}" if bad else "")


def not_diverging(val_losses: list[float], factor: float = 2.0) -> GateResult:
    """Divergence is the latest validation loss above factor × its best."""
    if not val_losses:
        return GateResult("not_diverging", False, "no validation loss", "validation never ran")
    best, last = min(val_losses), val_losses[-1]
    ok = math.isfinite(last) and last <= factor * best
    return GateResult("not_diverging", ok, f"last {last:.4f}, best {best:.4f}, bound {factor}×best",
                      "" if ok else "validation loss diverged")


def validation_improves(start: float, end: float, min_drop: float = 0.0,
                        name: str = "validation_improves") -> GateResult:
    ok = math.isfinite(end) and end < start - min_drop
    return GateResult(name, ok, f"{start:.4f} → {end:.4f}",
                      "" if ok else "validation loss did not fall below its start")


def text_loss_gate(text_loss: float, step: int, threshold: float, by_step: int) -> GateResult:
    """After an experimental resume: text loss below threshold within by_step steps, else abort."""
    if text_loss < threshold:
        return GateResult("text_loss", True, f"{text_loss:.4f} < {threshold} at step {step}")
    if step < by_step:
        return GateResult("text_loss", True, f"{text_loss:.4f} at step {step}, due by {by_step}", "pending")
    return GateResult("text_loss", False, f"{text_loss:.4f} ≥ {threshold} at step {step}",
                      f"not below {threshold} within {by_step} steps")


def all_passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results)


def first_failure(results: list[GateResult]) -> str:
    for r in results:
        if not r.passed:
            return f"gate {r.name} failed: {r.value}" + (f" ({r.reason})" if r.reason else "")
    return ""


def report_markdown(results: list[GateResult]) -> str:
    rows = "\n".join(f"| {r.name} | {'PASS' if r.passed else 'FAIL'} | {r.value} | {r.reason} |" for r in results)
    return "| gate | result | value | reason |\n|---|---|---|---|\n" + rows + "\n"


def exported_base_rows_identical(base_path, exported_path, base_rows: int) -> GateResult:
    """Rows 0..B-1 of the exported text tensors equal the base file's, bit for bit."""
    import torch

    from trainer.model import SPLIT_KEYS
    from trainer.weights import torch_load, upstream_keys_of

    base = upstream_keys_of(torch_load(base_path), base_path)
    exported = upstream_keys_of(torch_load(exported_path), exported_path)
    differing = [k for k in SPLIT_KEYS if not torch.equal(base[k][:base_rows], exported[k][:base_rows])]
    return GateResult("base_rows_bit_identical", not differing, f"{base_rows} rows × {len(SPLIT_KEYS)} tensors",
                      f"differ: {', '.join(differing)}" if differing else "")
