"""benchmarks/gpu_suite.py: the CPU dry run runs every item the GPU run does, and the suite survives failures."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def suite():
    return importlib.import_module("benchmarks.gpu_suite")


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_dry_run_measures_every_item_on_the_cpu(tmp_path):
    out = tmp_path / "suite.json"
    done = run_script("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    items = report["items"]
    assert report["dry_run"] and list(items) == ["throughput", "base_rows", "largest_batch", "checkpoint_stall",
                                                 "pytest_gpu"]
    for name, result in items.items():  # the dry run has time for all: nothing skipped, nothing failed
        assert "error" not in result and "skipped" not in result, (name, result)

    throughput = items["throughput"]
    assert set(throughput["baseline"]) == {"4"} and finite(throughput["baseline"]["4"]["tokens_s"])
    configs = throughput["configs"]
    assert {(c["compile"], c["checkpointing"]) for c in configs} == {(False, False), (False, True), (True, False),
                                                                      (True, True)}
    for c in configs:
        assert "error" not in c and "skipped" not in c, c
        for key in ("tokens_s", "pairs_s", "mfu", "memory_gib", "ratio"):
            assert finite(c[key]) and c[key] > 0, (key, c)
        assert c["recompiles"] is None if not c["compile"] else c["recompiles"] >= 0
        assert c["graphs_first_step"] == (1 if c["compile"] else 0)  # the compiled path really compiled

    split, hooks = items["base_rows"]["split"], items["base_rows"]["hooks"]
    assert split["steps_run"] == hooks["steps_run"] == 50
    assert split["bit_identical"] and split["max_abs_drift"] == 0.0 and split["new_rows_moved"] > 0
    assert not hooks["bit_identical"] and hooks["max_abs_drift"] > 0  # weight decay moves hooked base rows

    largest = items["largest_batch"]
    assert largest["bracketed"] and 0 < largest["largest_pairs_longest"] < largest["first_failing_pairs"]
    assert largest["token_budget"] == largest["largest_pairs_longest"] * largest["pair_tokens_longest"]
    fitting = [p["gib"] for p in largest["probes"] if p["pairs"] <= largest["largest_pairs_longest"]]
    assert fitting and max(fitting) <= largest["limit_gib"]

    stall = items["checkpoint_stall"]
    assert all(finite(stall[w][k]) for w in ("synchronous", "background")
               for k in ("blocked_s_median", "blocked_s_max", "write_s_median"))

    tests = items["pytest_gpu"]
    assert "tests/unit/test_train.py" in tests["files"] and tests["returncode"] == 0
    assert tests["counts"].get("skipped", 0) + tests["counts"].get("passed", 0) > 0

    assert "goal" in done.stdout and "fidel ÷ baseline" in done.stdout and "pytest -m gpu:" in done.stdout


def test_a_failing_item_is_recorded_and_the_others_still_run(suite, tmp_path, monkeypatch):
    def broken(plan, device, dtype, deadline):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(suite.MEASURE, "base_rows", broken)
    out = tmp_path / "suite.json"
    report = suite.run_suite(suite.DRY_PLAN, out, only=("base_rows", "checkpoint_stall"), dry_run=True)
    items = json.loads(out.read_text())["items"]
    assert items == json.loads(json.dumps(report["items"], default=str))
    assert items["base_rows"]["error"].startswith("RuntimeError: CUDA error: an illegal memory access")
    assert finite(items["checkpoint_stall"]["background"]["blocked_s_max"])
    assert items["throughput"] == {"skipped": "not selected (--only)"}


def test_items_past_the_global_deadline_are_skipped_not_run(suite, tmp_path, monkeypatch):
    ran = []
    for name in suite.ITEMS:
        monkeypatch.setitem(suite.MEASURE, name, lambda *args, name=name: ran.append(name) or {})
    plan = dataclasses.replace(suite.DRY_PLAN, total_s=0.5, min_item_s=1.0)
    report = suite.run_suite(plan, tmp_path / "suite.json", dry_run=True)
    assert ran == []
    assert all(r["skipped"].startswith("time") for r in report["items"].values())
    suite.print_table(report)  # a report of skips still prints


def test_a_config_whose_time_ran_out_is_marked_skipped(suite):
    plan = dataclasses.replace(suite.DRY_PLAN, min_item_s=10.0)
    out = suite.throughput(plan, torch.device("cpu"), None, deadline=0.0)
    assert out["baseline"]["4"] == {"skipped": "time"}
    assert len(out["configs"]) == 4 and all(c["skipped"] == "time" for c in out["configs"])


def test_existing_output_is_never_overwritten(tmp_path):
    out = tmp_path / "suite.json"
    out.write_text("kept")
    done = run_script("--dry-run", "--out", str(out), timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == f"error: {out}: exists; choose another --out"
    assert out.read_text() == "kept"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
def test_full_run_without_cuda_stops_with_one_line(tmp_path):
    done = run_script("--out", str(tmp_path / "suite.json"), timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--dry-run" in done.stderr
    assert not (tmp_path / "suite.json").exists()
