"""Everything a lent GPU should measure, in one unattended command: one JSON, one short table, ≤ 8 minutes.

    .venv/bin/python -m benchmarks.gpu_suite --out "$OUT/gpu_suite.json"     # one H200 (or any ≥ 80 GiB GPU)
    .venv/bin/python -m benchmarks.gpu_suite --dry-run                       # CPU, size "dry", seconds

Items (each in its own try block: a failure records its error and the rest still run):

1. throughput — fidel's step against the community baseline (benchmarks/step_throughput.py) at full size, bf16,
   batch 32 then 16, eager and compiled, with and without activation checkpointing: real tok/s, pairs/s, MFU on
   real tokens, peak memory, fidel ÷ baseline, and the graphs torch.compile built after the first step
   (recompiles across bucket shapes). The baseline is measured once per batch size, before fidel's setups, and
   freed before them, so each peak is one model's.
2. base_rows — 50 bf16 steps with fused AdamW, weight decay 0.01 and clipping 1.0: the split freeze must leave the
   base text rows bit-identical; the community hooks freeze's drift beside it.
3. largest_batch — the largest token budget whose training step fits in 80 GiB at full size (eager, no activation
   checkpointing), by bisection on the number of longest (15 s) pairs; an out-of-memory error means "does not
   fit" (the allocator is capped at 80 GiB).
4. checkpoint_stall — benchmarks/checkpoint_stall.py at full size: the loop's blocked time per save with the
   background writer, and the write time behind it (the synchronous writer beside it).
5. pytest_gpu — `pytest -m gpu` on the test files that have GPU tests, in a subprocess: its summary line.

A global deadline (8 min less a margin) and a budget per item keep the whole run inside its slot: an item starts
only with half its budget left, a setup of item 1 only with the time the longest of its kind took; what does not
fit is recorded as "skipped: time". The JSON is rewritten after every item, so a run killed from outside keeps
what it measured. --dry-run runs the same items on the CPU at size "dry" (fp32, the "aot_eager" compile backend,
a small memory cap): it tests the suite, it does not measure anything worth comparing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from fidel_tts.trainer.data.manifest import collate
from fidel_tts.trainer.model.weights import same_bytes

from benchmarks.checkpoint_stall import measure_stall
from benchmarks.step_throughput import (
    SIZES,
    baseline_setup,
    fidel_setup,
    gpt_config,
    peak_flops,
    run_step,
    saved_activation_bytes,
    summary,
    synthetic_pairs,
)

ROOT = Path(__file__).resolve().parents[1]

GOALS = {
    "ratio_b32": 3.0,  # fidel ÷ community baseline, real tokens/s, batch 32, bf16
    "mfu": 0.40,  # on real tokens
    "memory_gib_b32": 80.0,
    "stall_s": 1.0,  # loop blocked per save, background writer
}
ITEMS = ("throughput", "base_rows", "largest_batch", "checkpoint_stall", "pytest_gpu")


@dataclass(frozen=True)
class Plan:
    """What one run measures: the GPU plan, or the dry run's stand-in for it."""

    size: str
    stall_size: str
    device: str
    amp: str  # bf16 | off
    batch_sizes: tuple[int, ...]
    warmup: int
    steps: int
    compile_backend: str
    base_row_steps: int
    base_row_batch: int
    memory_limit_gib: float
    stall_saves: int
    total_s: float
    budgets_s: dict  # item → seconds
    min_item_s: float  # an item with less time left than this is skipped


# 450 s of items + imports and the table: inside 8 minutes; the budgets add up to the total
GPU_PLAN = Plan(size="full", stall_size="full", device="cuda", amp="bf16", batch_sizes=(32, 16), warmup=3, steps=10,
                compile_backend="inductor", base_row_steps=50, base_row_batch=8, memory_limit_gib=80.0,
                stall_saves=2, total_s=450.0,
                budgets_s={"throughput": 230, "base_rows": 35, "largest_batch": 55, "checkpoint_stall": 45,
                           "pytest_gpu": 85},
                min_item_s=15.0)
DRY_PLAN = Plan(size="dry", stall_size="demo", device="cpu", amp="off", batch_sizes=(4,), warmup=1, steps=3,
                compile_backend="aot_eager", base_row_steps=50, base_row_batch=2, memory_limit_gib=0.05,
                stall_saves=1, total_s=180.0,
                budgets_s={"throughput": 60, "base_rows": 30, "largest_batch": 30, "checkpoint_stall": 30,
                           "pytest_gpu": 30},
                min_item_s=1.0)


class Clock:
    def __init__(self, total_s: float):
        self.started = time.monotonic()
        self.deadline = self.started + total_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def item_deadline(self, budget_s: float) -> float:
        return min(self.deadline, time.monotonic() + budget_s)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_text(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{place}"[:500]


def guarded(fn, *args) -> dict:
    """Run one measurement; an exception becomes {"error": ...} and memory is given back either way."""
    started = time.monotonic()
    try:
        result = fn(*args)
    except Exception as exc:  # one failure must not lose the other items
        result = {"error": error_text(exc)}
    finally:
        free_memory()
    return {**result, "seconds": round(time.monotonic() - started, 2)}


# ----------------------------------------------------------------------------- 1. throughput

def graphs_built() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure(setup, pairs, cfg, device, plan: Plan, deadline: float, peak: float) -> dict:
    """Warm up, then time up to plan.steps steps (fewer when the item's time runs out, at least 3)."""
    graphs_before = graphs_built()
    run_step(setup, 0, pairs, cfg, device)
    graphs_first = graphs_built()
    for i in range(1, plan.warmup):
        run_step(setup, i, pairs, cfg, device)
    records = []
    for i in range(plan.warmup, plan.warmup + plan.steps):
        if len(records) >= 3 and time.monotonic() > deadline:
            break
        records.append(run_step(setup, i, pairs, cfg, device))
    result = summary(records, peak)
    result["steps_measured"] = len(records)
    result["graphs_first_step"] = graphs_first - graphs_before
    result["recompiles"] = graphs_built() - graphs_first  # graphs built for later bucket shapes
    if device.type == "cuda":
        result["memory_gib"], result["memory_kind"] = result["peak_gib"], "peak allocated (CUDA)"
    else:  # no allocator statistics on the CPU: what autograd keeps for backward of the first batch
        batch = collate([pairs[i] for i in setup.batches[0]])
        result["memory_gib"] = saved_activation_bytes(setup, batch) / 2**30
        result["memory_kind"] = "saved for backward, batch 0 (CPU)"
    del result["peak_gib"]
    return result


def rate(make_setup, pairs, cfg, device, plan: Plan, deadline: float, peak: float) -> dict:
    torch._dynamo.reset()  # each compiled setup counts its own graphs
    return measure(make_setup(), pairs, cfg, device, plan, deadline, peak)


def throughput(plan: Plan, device, dtype, deadline: float) -> dict:
    cfg = gpt_config(plan.size)
    peak, peak_note = peak_flops(device, None)
    out = {"peak_tflops": peak / 1e12, "peak_note": peak_note, "baseline": {}, "configs": []}
    longest = {False: 0.0, True: 0.0}
    for batch_size in plan.batch_sizes:
        pairs = synthetic_pairs(20 * batch_size, plan.size, seed=0)
        timing = (pairs, cfg, device, plan, deadline, peak)
        baseline = partial(baseline_setup, cfg, pairs, batch_size, 0, device, dtype)
        base = out["baseline"][str(batch_size)] = (guarded(rate, baseline, *timing)
                                                   if deadline - time.monotonic() >= plan.min_item_s
                                                   else {"skipped": "time"})
        for compiled in (False, True):
            for checkpointing in (False, True):
                row = {"batch_size": batch_size, "compile": compiled, "checkpointing": checkpointing}
                # a setup starts only with the time the longest of its kind took so far (compiling is slow)
                if deadline - time.monotonic() < max(plan.min_item_s, longest[compiled]):
                    out["configs"].append({**row, "skipped": "time"})
                    continue
                fidel = partial(fidel_setup, cfg, pairs, batch_size, 0, device, dtype,
                                plan.compile_backend if compiled else None, checkpointing)
                result = {**row, **guarded(rate, fidel, *timing)}
                if "tokens_s" in result and "tokens_s" in base:
                    result["ratio"] = result["tokens_s"] / base["tokens_s"]
                if not compiled:
                    result["recompiles"] = None  # nothing compiled
                longest[compiled] = max(longest[compiled], result["seconds"])
                out["configs"].append(result)
    torch._dynamo.reset()
    return out


# ----------------------------------------------------------------------------- 2. base rows

def base_rows_check(plan: Plan, device, dtype, deadline: float) -> dict:
    """split: base rows bit-identical after the steps; hooks: how far weight decay moved them."""
    cfg = gpt_config(plan.size)
    pairs = synthetic_pairs(16 * plan.base_row_batch, plan.size, seed=1)
    out = {"steps": plan.base_row_steps, "weight_decay": 0.01, "grad_clip": 1.0}
    for freeze in ("split", "hooks"):
        def run(freeze=freeze):
            setup = fidel_setup(cfg, pairs, plan.base_row_batch, 1, device, dtype, None, False, freeze=freeze)
            before = [t.detach().clone() for t in setup.model.base_row_tensors()]
            new_before = setup.model.text_embedding.weight[setup.model.base_rows:].detach().clone()
            steps = 0
            while steps < plan.base_row_steps and time.monotonic() < deadline:
                run_step(setup, steps, pairs, cfg, device)
                steps += 1
            after = setup.model.base_row_tensors()
            return {"steps_run": steps,
                    "bit_identical": all(same_bytes(a, b) for a, b in zip(before, after, strict=True)),
                    "max_abs_drift": max(float((a.float() - b.float()).abs().max()) for a, b in
                                         zip(before, after, strict=True)),
                    "new_rows_moved": float((setup.model.text_embedding.weight[setup.model.base_rows:].detach()
                                             - new_before).abs().max()),
                    "fused_adamw": bool(setup.optimizer.defaults.get("fused"))}

        out[freeze] = guarded(run)
    return out


# ----------------------------------------------------------------------------- 3. largest batch

def largest_batch(plan: Plan, device, dtype, deadline: float) -> dict:
    cfg = gpt_config(plan.size)
    spec = SIZES[plan.size]
    longest = synthetic_pairs(8, plan.size, seed=2, seconds=(spec.seconds[1], spec.seconds[1]))
    pair_tokens = max(len(p.text_ids) + len(p.codes) for p in longest)
    typical = synthetic_pairs(256, plan.size, seed=3)
    mean_pair_tokens = sum(len(p.text_ids) + len(p.codes) for p in typical) / len(typical)
    limit = plan.memory_limit_gib * 2**30
    setup = fidel_setup(cfg, longest, 1, 2, device, dtype, None, False)
    state_bytes = 4 * sum(p.numel() * p.element_size() for p in setup.model.parameters() if p.requires_grad)
    if device.type == "cuda":  # allocations past the limit raise out-of-memory instead of succeeding
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
    probes = []

    def used_bytes(pairs: int) -> float:
        batch = collate([longest[i % len(longest)] for i in range(pairs)])
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                setup.step(batch)
                torch.cuda.synchronize(device)
                used = torch.cuda.max_memory_allocated(device)
            else:  # CPU: parameters, gradients and AdamW moments plus what autograd keeps for backward
                used = state_bytes + saved_activation_bytes(setup, batch)
        except torch.OutOfMemoryError:
            used = math.inf
        finally:
            setup.model.zero_grad(set_to_none=True)
            free_memory()
        probes.append({"pairs": pairs, "gib": used / 2**30 if math.isfinite(used) else "out of memory"})
        return used

    try:
        fits, fails, pairs = 0, None, 8
        while fails is None and pairs <= 1024 and time.monotonic() < deadline:  # grow until it fails
            if used_bytes(pairs) <= limit:
                fits, pairs = pairs, pairs * 2
            else:
                fails = pairs
        while fails is not None and fails - fits > max(1, fits // 32) and time.monotonic() < deadline:
            middle = (fits + fails) // 2
            fits, fails = (middle, fails) if used_bytes(middle) <= limit else (fits, middle)
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    budget = fits * pair_tokens
    return {"limit_gib": plan.memory_limit_gib, "setup": "eager, no activation checkpointing",
            "pair_tokens_longest": pair_tokens, "mean_pair_tokens": mean_pair_tokens,
            "largest_pairs_longest": fits, "first_failing_pairs": fails, "token_budget": budget,
            "pairs_of_mean_length": budget / mean_pair_tokens, "bracketed": fails is not None,
            "probes": probes}


# ----------------------------------------------------------------------------- 4, 5

def checkpoint_stall(plan: Plan, device, dtype, deadline: float) -> dict:
    return measure_stall(plan.stall_size, device, saves=plan.stall_saves, steps_between=2)


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))


SUMMARY_LINE = re.compile(r"\d+ (passed|failed|skipped|errors?|deselected)")


def pytest_gpu(plan: Plan, device, dtype, deadline: float) -> dict:
    files = gpu_test_files()
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return {"files": files, "error": "timed out (the item's time ran out)"}
    lines = [line.strip("= ") for line in done.stdout.splitlines() if SUMMARY_LINE.search(line)]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                        lines[-1] if lines else "")}
    result = {"files": files, "returncode": done.returncode, "summary": lines[-1] if lines else None,
              "counts": counts}
    if not lines:
        result["error"] = f"no pytest summary line (exit {done.returncode}): {done.stderr.strip()[-300:]}"
    elif not torch.cuda.is_available():
        result["note"] = "no CUDA here: the gpu tests skip themselves"
    return result


MEASURE = {"throughput": throughput, "base_rows": base_rows_check, "largest_batch": largest_batch,
           "checkpoint_stall": checkpoint_stall, "pytest_gpu": pytest_gpu}


# ----------------------------------------------------------------------------- report

def verdict(ok: bool | None, dry_run: bool) -> str:
    if ok is None:
        return "no figure"
    if dry_run:
        return "(dry run)"
    return "MET" if ok else "MISSED"


def goals(report: dict) -> list[tuple[str, str, str]]:
    """(goal, figure, verdict) rows, from the items that ran."""
    dry = report["dry_run"]
    items = report["items"]
    b32 = str(max(report["plan"]["batch_sizes"]))
    configs = [c for c in items.get("throughput", {}).get("configs", [])
               if str(c["batch_size"]) == b32 and "tokens_s" in c]
    best = max(configs, key=lambda c: c["tokens_s"], default=None)
    rows = []
    ratio = best.get("ratio") if best else None
    rows.append((f"fidel ÷ baseline ≥ {GOALS['ratio_b32']:.0f}× (batch {b32})",
                 f"{ratio:.2f}× ({config_name(best)})" if ratio else "—",
                 verdict(ratio >= GOALS["ratio_b32"] if ratio else None, dry)))
    mfu = best["mfu"] if best and math.isfinite(best["mfu"]) else None
    rows.append((f"MFU ≥ {GOALS['mfu']:.0%}", f"{mfu:.1%} ({config_name(best)})" if mfu is not None else "—",
                 verdict(mfu >= GOALS["mfu"] if mfu is not None else None, dry)))
    fitting = [c for c in configs if c.get("memory_kind", "").startswith("peak")]
    lightest = min(fitting, key=lambda c: c["memory_gib"], default=None)
    rows.append((f"batch {b32} within {GOALS['memory_gib_b32']:.0f} GiB",
                 f"{lightest['memory_gib']:.1f} GiB peak ({config_name(lightest)})" if lightest else "—",
                 verdict(lightest["memory_gib"] <= GOALS["memory_gib_b32"] if lightest else None, dry)))
    stall = items.get("checkpoint_stall", {}).get("background")
    rows.append((f"checkpoint stall ≤ {GOALS['stall_s']:.0f} s per save",
                 f"{stall['blocked_s_max']:.3f} s (max), write {stall['write_s_median']:.3g} s behind" if stall
                 else "—", verdict(stall["blocked_s_max"] <= GOALS["stall_s"] if stall else None, dry)))
    split = items.get("base_rows", {}).get("split", {})
    rows.append(("base rows bit-identical (split)",
                 f"{split['bit_identical']} after {split['steps_run']} steps" if "bit_identical" in split else "—",
                 verdict(split.get("bit_identical"), False) if "bit_identical" in split else "no figure"))
    return rows


def config_name(config: dict | None) -> str:
    if not config:
        return ""
    return f"{'compiled' if config['compile'] else 'eager'}{', checkpointing' if config['checkpointing'] else ''}"


def item_state(result: dict) -> str:
    return f"skipped: {result['skipped']}" if "skipped" in result else f"ERROR {result['error']}" \
        if "error" in result else f"ok ({result.get('seconds', 0):.0f} s)"


def print_table(report: dict) -> None:
    items = report["items"]
    print(f"\nGPU suite on {report['device']} ({'dry run' if report['dry_run'] else 'full size, ' + report['plan']['amp']}),"
          f" {report['seconds']:.0f} s")
    for name in ITEMS:
        print(f"  {name:<17} {item_state(items.get(name, {'skipped': 'not run'}))}")
    configs = items.get("throughput", {}).get("configs", [])
    if configs:
        print(f"\n{'batch':>5} {'setup':<31} {'tok/s':>9} {'pairs/s':>8} {'MFU':>6} {'memory GiB':>10} "
              f"{'÷ base':>7} {'recompiles':>10}")
        for b, base in items["throughput"]["baseline"].items():
            if "tokens_s" in base:
                print(f"{b:>5} {'community baseline':<31} {base['tokens_s']:9.0f} {base['pairs_s']:8.2f} "
                      f"{base['mfu']:6.1%} {base['memory_gib']:10.3g}")
        for c in configs:
            name = f"fidel {config_name(c)}"
            if "tokens_s" not in c:
                print(f"{c['batch_size']:>5} {name:<31} {item_state(c)}")
                continue
            ratio = f"{c['ratio']:6.2f}×" if "ratio" in c else "—"
            recompiles = "—" if c["recompiles"] is None else str(c["recompiles"])
            print(f"{c['batch_size']:>5} {name:<31} {c['tokens_s']:9.0f} {c['pairs_s']:8.2f} {c['mfu']:6.1%} "
                  f"{c['memory_gib']:10.3g} {ratio:>7} {recompiles:>10}")
    hooks = items.get("base_rows", {}).get("hooks", {})
    if "max_abs_drift" in hooks:
        print(f"\nhooks freeze, same steps: base rows drift up to {hooks['max_abs_drift']:.3g} "
              f"(bit-identical: {hooks['bit_identical']})")
    largest = items.get("largest_batch", {})
    if "token_budget" in largest:
        print(f"largest batch within {largest['limit_gib']:g} GiB: token budget {largest['token_budget']} = "
              f"{largest['largest_pairs_longest']} longest pairs = {largest['pairs_of_mean_length']:.0f} pairs of "
              f"mean length{'' if largest['bracketed'] else ' (no failure found: a lower bound)'}")
    tests = items.get("pytest_gpu", {})
    if tests.get("summary"):
        print(f"pytest -m gpu: {tests['summary']}")
    print(f"\n{'goal':<36} {'figure':<48} verdict")
    for goal, figure, mark in goals(report):
        print(f"{goal:<36} {figure:<48} {mark}")


def write_json(report: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    os.replace(temporary, path)


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def run_suite(plan: Plan, out: Path, only: tuple[str, ...] = ITEMS, dry_run: bool = False) -> dict:
    device = torch.device(plan.device)
    dtype = torch.bfloat16 if plan.amp == "bf16" else None
    clock = Clock(plan.total_s)
    report = {"dry_run": dry_run, "plan": asdict(plan), "goals": GOALS, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "git_commit": git_commit(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "items": {}, "seconds": 0.0}
    for name in ITEMS:
        if name not in only:
            result = {"skipped": "not selected (--only)"}
        elif clock.left() < max(plan.min_item_s, plan.budgets_s[name] / 2):  # it would overrun the deadline
            result = {"skipped": f"time (global deadline of {plan.total_s:.0f} s)"}
        else:
            print(f"[{time.monotonic() - clock.started:5.0f} s] {name} …", flush=True)
            result = guarded(MEASURE[name], plan, device, dtype, clock.item_deadline(plan.budgets_s[name]))
        report["items"][name] = result
        report["seconds"] = time.monotonic() - clock.started
        write_json(report, out)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same items on the CPU at a tiny size, in seconds")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON to write (default: gpu_suite-<UTC time>.json here); never overwritten")
    parser.add_argument("--only", nargs="+", choices=ITEMS, default=list(ITEMS), help="run only these items")
    args = parser.parse_args()
    out = args.out or Path(f"gpu_suite-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    if out.exists():
        print(f"error: {out}: exists; choose another --out", file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"error: {out.parent}: no such folder (--out)", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here: run the suite on the GPU machine, or --dry-run on a CPU", file=sys.stderr)
        return 2
    report = run_suite(DRY_PLAN if args.dry_run else GPU_PLAN, out, tuple(args.only), args.dry_run)
    print_table(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
