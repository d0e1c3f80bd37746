"""Checkpoint triage: start fresh, resume, or refuse, from evidence in the files (design.md §5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.checkpoint import list_checkpoints, read_sidecar, verify_checkpoint
from trainer.errors import FidelError


@dataclass
class Candidate:
    path: str
    kind: str  # fidel | foreign
    valid: bool
    step: int | None
    detail: str


@dataclass
class Decision:
    action: str  # fresh | resume | refuse
    checkpoint: str | None
    reason: str
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        rows = "\n".join(f"| {Path(c.path).name} | {c.kind} | {c.step} | {'yes' if c.valid else 'no'} | {c.detail} |"
                         for c in self.candidates)
        table = "| checkpoint | kind | step | valid | evidence |\n|---|---|---|---|---|\n" + (rows or "| (none) ||||\n")
        return f"**Decision: {self.action}**: {self.reason}\n\n{table}\n"


def fidel_candidate(path: Path, lineage: dict | None) -> Candidate:
    try:
        meta = verify_checkpoint(path)
    except FidelError as exc:
        return Candidate(str(path), "fidel", False, None, exc.problem)
    if lineage:
        for key in ("base_rows_sha256", "tokenizer_sha256"):
            if lineage.get(key) and meta.get(key) != lineage[key]:
                return Candidate(str(path), "fidel", False, meta["step"], f"{key} differs from this run's")
    return Candidate(str(path), "fidel", True, meta["step"], f"sha256 verified, lineage {meta['lineage_id'][:8]}")


def triage_output_dir(output_dir: str | Path, lineage: dict | None = None) -> Decision:
    """No checkpoint: fresh. Newest checkpoint that verifies: resume; newer broken ones are passed over."""
    folder = Path(output_dir)
    candidates = [fidel_candidate(p, lineage) for p in list_checkpoints(folder)]
    valid = [c for c in candidates if c.valid]
    if not candidates:
        return Decision("fresh", None, f"no checkpoint in {folder}", candidates)
    if not valid:
        return Decision("refuse", None, f"{len(candidates)} checkpoint(s) in {folder}, none verifies; "
                                        "move them aside or choose a new output dir", candidates)
    skipped = candidates[:candidates.index(valid[0])]  # newest first: everything before the first valid one
    note = f"; passed over {len(skipped)} newer invalid checkpoint(s)" if skipped else ""
    return Decision("resume", valid[0].path, f"fidel lineage at step {valid[0].step}{note}", candidates)


def triage_path(path: str | Path, lineage: dict | None = None) -> Decision:
    """Triage a folder (a fidel output dir) or one checkpoint file."""
    path = Path(path)
    if path.is_dir():
        return triage_output_dir(path, lineage)
    if not path.exists():
        raise FidelError(path, "no such checkpoint or folder")
    try:
        read_sidecar(path)
    except FidelError as exc:
        foreign = Candidate(str(path), "foreign", False, None, exc.problem)
        return Decision("fresh", None, "not a fidel checkpoint (no verifiable sidecar): not resumed as a lineage",
                        [foreign])
    candidate = fidel_candidate(path, lineage)
    if candidate.valid:
        return Decision("resume", str(path), f"fidel lineage at step {candidate.step}", [candidate])
    return Decision("refuse", None, f"{path.name}: {candidate.detail}", [candidate])
