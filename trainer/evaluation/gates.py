"""Evaluation gates (docs/design.md §6): small pure functions, each a PASS/FAIL with its numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from fidel_tts.trainer.markdown import bullets, escape, table
from fidel_tts.trainer.model.gpt import SPLIT_KEYS
from fidel_tts.trainer.model.weights import model_base_rows_hash, torch_load, upstream_keys_of
from fidel_tts.trainer.report import Check

if TYPE_CHECKING:
    import torch


def base_intact(expected_sha256: str, actual_sha256: str) -> Check:
    same = expected_sha256 == actual_sha256
    return Check("base_intact", same, f"sha256 {actual_sha256[:16]}…",
                      "" if same else f"expected {expected_sha256[:16]}…")


def finite(losses: dict[str, float]) -> Check:
    bad = sorted(k for k, v in losses.items() if not math.isfinite(v))
    return Check("finite", not bad, ", ".join(f"{k}={losses[k]:.4g}" for k in sorted(losses)),
                      f"non-finite: {', '.join(bad)}" if bad else "")


def not_diverging(val_losses: list[float], factor: float = 2.0) -> Check:
    """Divergence is the latest validation loss above factor × its best."""
    if not val_losses:
        return Check("not_diverging", False, "no validation loss", "validation never ran")
    best, last = min(val_losses), val_losses[-1]
    ok = math.isfinite(last) and last <= factor * best
    return Check("not_diverging", ok, f"last {last:.4f}, best {best:.4f}, bound {factor}×best",
                      "" if ok else "validation loss diverged")


def validation_improves(start: float, end: float, min_drop: float = 0.0,
                        name: str = "validation_improves") -> Check:
    ok = math.isfinite(end) and end < start - min_drop
    return Check(name, ok, f"{start:.4f} → {end:.4f}",
                      "" if ok else "validation loss did not fall below its start")


def text_loss_gate(text_loss: float, step: int, threshold: float, by_step: int) -> Check:
    """After an experimental resume: text loss below threshold within by_step steps, else abort."""
    if text_loss < threshold:
        return Check("text_loss", True, f"{text_loss:.4f} < {threshold} at step {step}")
    if step < by_step:
        return Check("text_loss", True, f"{text_loss:.4f} at step {step}, due by {by_step}", "pending")
    return Check("text_loss", False, f"{text_loss:.4f} ≥ {threshold} at step {step}",
                      f"not below {threshold} by step {by_step}")


def all_passed(results: list[Check]) -> bool:
    return all(r.passed or r.advisory for r in results)


def advisory_failures(results: list[Check]) -> list[str]:
    return [r.name for r in results if r.advisory and not r.passed]


def verdict(results: list[Check]) -> str:
    """The report's headline, as the MLflow tags say it: `gates` PASS or FAIL (enforced gates), `gates.advisory`."""
    advisory = advisory_failures(results)
    return ("PASS" if all_passed(results) else "FAIL") + (f"; advisory FAIL: {', '.join(advisory)}" if advisory else "")


def first_failure(results: list[Check]) -> str:
    for r in results:
        if not r.passed and not r.advisory:
            return f"gate {r.name} failed: {r.value}" + (f" ({r.reason})" if r.reason else "")
    return ""


def report_markdown(results: list[Check]) -> str:
    """The verdict and a narrow table; the reasons are in reasons_markdown."""
    return (f"**Gates: {escape(verdict(results))}**\n\n"
            + table(["gate", "result", "value"], [[r.name, r.label(), r.value] for r in results]))


def reasons_markdown(results: list[Check]) -> str:
    return bullets([(f"{r.name} {r.label()}", f"{r.value}. {r.reason}" if r.reason else r.value) for r in results])


def exported_base_rows_identical(base_path, exported_path, base_rows: int) -> Check:
    """Rows 0..B-1 of the exported text tensors equal the base file's, bit for bit."""
    base = upstream_keys_of(torch_load(base_path), base_path)
    exported = upstream_keys_of(torch_load(exported_path), exported_path)
    differing = [k for k in SPLIT_KEYS if not torch.equal(base[k][:base_rows], exported[k][:base_rows])]
    return Check("base_rows_bit_identical", not differing, f"{base_rows} rows × {len(SPLIT_KEYS)} tensors",
                      f"differ: {', '.join(differing)}" if differing else "")


def new_rows_learning(init_rows: torch.Tensor, current_rows: torch.Tensor, used_rows: list[int],
                      min_share: float = 0.9, min_delta: float = 0.0) -> Check:
    """New rows of tokens present in the data moved from their init (max |Δ| > min_delta) for at least
    min_share of them. Rows are indices into the new-row block (token id − B)."""
    if not used_rows:
        return Check("new_rows_learning", False, "no new-row token in the data", "nothing to learn")
    delta = (current_rows[used_rows].float() - init_rows[used_rows].float()).abs().flatten(1).amax(1)
    moved = int((delta > min_delta).sum())
    share = moved / len(used_rows)
    ok = share >= min_share
    return Check("new_rows_learning", ok,
                      f"{moved}/{len(used_rows)} used new rows moved (max |Δ| {float(delta.max()):.3g})",
                      "" if ok else f"fewer than {min_share:.0%} of the used new rows moved from their init")


def inference_smoke(generated: list[tuple[int, bool, int]], min_ratio: float = 0.2, max_ratio: float = 5.0,
                    decode: str = "") -> Check:
    """generated: (codes emitted, stop code emitted, reference code length) per validation text. Every text must
    stop, with emitted/reference inside [min_ratio, max_ratio]. decode: the decode that produced them (a key of
    trainer.evaluation.generate.DECODES), named in the value."""
    decoded_as = f", decode {decode}" if decode else ""
    if not generated:
        return Check("inference_smoke", False, f"no text decoded{decoded_as}", "nothing decoded")
    unstopped = sum(not stopped for _, stopped, _ in generated)
    ratios = [n / max(1, ref) for n, _, ref in generated]
    outside = sum(not (min_ratio <= r <= max_ratio) for r in ratios)
    ok = unstopped == 0 and outside == 0
    value = (f"{len(generated) - unstopped}/{len(generated)} stopped, length ratio "
             f"{min(ratios):.2f}..{max(ratios):.2f} (bound {min_ratio}..{max_ratio}){decoded_as}")
    reason = "" if ok else "; ".join(x for x in (f"{unstopped} never emitted the stop code" if unstopped else "",
                                                 f"{outside} outside the length bound" if outside else "") if x)
    return Check("inference_smoke", ok, value, reason)


@dataclass
class GateConfig:
    """What the validation-time gates check. text_loss_threshold/by_step arm the text-loss gate."""

    base_rows_sha256: str | None = None  # None: base-intact not checked (a --freeze hooks comparison run)
    diverge_factor: float = 2.0
    text_loss_weight: float = 0.2
    mel_loss_weight: float = 0.8
    text_loss_threshold: float | None = None
    text_loss_by_step: int | None = None


def validation_gates(config: GateConfig, step: int, metrics: dict, history: list[dict], model) -> list[Check]:
    """The gates that can run at every validation: base intact, finite, not diverging, text loss (when armed)."""
    results = []
    if config.base_rows_sha256:
        results.append(base_intact(config.base_rows_sha256, model_base_rows_hash(model)))
    results.append(finite({k: v for k, v in metrics.items() if k.endswith("_loss")}))
    totals = [config.text_loss_weight * h["val_text_loss"] + config.mel_loss_weight * h["val_mel_loss"]
              for h in history]
    results.append(not_diverging(totals, config.diverge_factor))
    if config.text_loss_threshold is not None and config.text_loss_by_step is not None:
        results.append(text_loss_gate(metrics["val_text_loss"], step, config.text_loss_threshold,
                                      config.text_loss_by_step))
    return results


def validation_hook(config: GateConfig, on_results=lambda step, results: None):
    """A TrainHooks.on_validation: runs the gates, reports them, returns the first failure (training then saves
    and ends "failed" with it) or None."""

    def hook(step: int, metrics: dict, history: list[dict], model) -> str | None:
        results = validation_gates(config, step, metrics, history, model)
        on_results(step, results)
        return first_failure(results) or None

    return hook


def new_row_ids(text_ids: list, base_rows: int) -> list[int]:
    """Indices into the new-row block (token id − B) of the new tokens that occur in the given texts."""
    used = set()
    for ids in text_ids:
        used.update(int(i) - base_rows for i in ids if int(i) >= base_rows)
    return sorted(used)


def new_rows_of(model_state: dict, base_rows: int) -> torch.Tensor:
    """Rows B..N of text_embedding from a fidel checkpoint's model state (split or hooks layout)."""
    if "text_embedding.new" in model_state:
        return model_state["text_embedding.new"]
    return model_state["text_embedding.weight"][base_rows:]
