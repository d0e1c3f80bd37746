"""The bad-input suite as a table: for each case of tests/integration/test_bad_inputs.py (and, with --faults, the real
faults: SIGKILL, SIGTERM, a second process), the exit code, fidel's last stderr line, whether a traceback
showed, and whether any file that existed before changed; then the counts.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bad_inputs [--faults] [--markdown]

Runs as root to mount the small tmpfs disks (full, read-only); elsewhere those cases are listed as skipped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from tests.fixtures.synthetic import make_tiny_project
from tests.integration.test_bad_inputs import (
    CASES,
    FAULTS,
    build_template,
    new_workspace,
    run_case,
    train_template,
)

REPO = Path(__file__).resolve().parents[1]


def verdict(outcome, code: int, expect: str) -> str:
    good = (outcome.code == code and not outcome.traceback and not outcome.changed
            and expect in (outcome.last_line if code == 2 else outcome.last_line + outcome.stderr))
    return "ok" if good else "WRONG"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", action="store_true", help="also the slow real faults (subprocesses)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = parser.parse_args()
    rows, tally = [], Counter()
    with tempfile.TemporaryDirectory(prefix="fidel-bad-inputs-") as tmp:
        tmp = Path(tmp)
        project = make_tiny_project(tmp / "template" / "project")
        trained = train_template(project, tmp / "template" / "trained")
        parquet = build_template(project, tmp / "template" / "parquet")
        runs = [(c.name, c.kind, lambda ws, c=c: run_case(c, ws), c.code, c.expect) for c in CASES]
        runs += FAULTS if args.faults else []
        for i, (name, kind, run, code, expect) in enumerate(runs):
            ws = new_workspace(project, trained, parquet, tmp / f"case{i:03d}")
            try:
                outcome = run(ws)
            except pytest.skip.Exception as skipped:
                rows.append((kind, name, "-", f"skipped: {skipped.msg}", "-", "-", "skipped"))
                tally[(kind, "skipped")] += 1
                continue
            finally:
                ws.unmount()
            result = verdict(outcome, code, expect)
            tally[(kind, result)] += 1
            rows.append((kind, name, str(outcome.code), outcome.last_line[:150], "yes" if outcome.traceback else "no",
                         str(len(outcome.changed)), result))
    head = ("kind", "case", "exit", "last stderr line", "traceback", "files changed", "verdict")
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    else:
        for row in [head, *rows]:
            print(f"{row[0]:<12} {row[1][:42]:<42} {row[2]:>4}  {row[4]:<9} {row[5]:>5}  {row[6]:<7} {row[3]}")
    print()
    kinds = sorted({kind for kind, _ in tally})
    for kind in kinds:
        print(f"{kind:<12} " + ", ".join(f"{tally[(kind, v)]} {v}" for v in ("ok", "WRONG", "skipped")
                                          if tally[(kind, v)]))
    total = Counter()
    for (_, v), n in tally.items():
        total[v] += n
    print(f"{'total':<12} {sum(total.values())} cases: " + ", ".join(f"{total[v]} {v}" for v in ("ok", "WRONG", "skipped")))
    return 0 if not total["WRONG"] else 1


if __name__ == "__main__":
    sys.exit(main())
