"""Data checks on paired manifests, before any GPU money is spent (design.md §3).

Fatal problems (no manifest, schema errors, nothing usable) stop the flow. Row problems drop the row and
are listed with manifest, line, id and problem, up to a tolerance (`max_bad_rows`, a fraction).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trainer.config import GPTConfig
from trainer.data import Pair, load_npy, read_manifest
from trainer.errors import FidelError
from trainer.text import script_share

UNK_ID = 2


@dataclass
class Problem:
    manifest: str
    line: int
    id: str
    check: str
    detail: str

    def line_text(self) -> str:
        return f"{self.manifest}:{self.line}: {self.id}: {self.check}: {self.detail}"


@dataclass
class DataReport:
    manifests: list[str]
    pairs: int
    kept: int
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    speakers: int = 0
    fatal: str = ""

    @property
    def passed(self) -> bool:
        return not self.fatal

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def to_markdown(self) -> str:
        rows = "\n".join(f"| {check} | {n} |" for check, n in sorted(self.counts.items()))
        head = (f"**{self.kept} of {self.pairs} pairs kept** from {len(self.manifests)} manifest(s), "
                f"{self.speakers} speakers.\n\n")
        body = "| check | rows failing |\n|---|---|\n" + (rows or "| (none) | 0 |") + "\n"
        shown = "\n".join(f"- `{p.line_text()}`" for p in self.problems[:20])
        return head + body + (f"\nFirst problems:\n{shown}\n" if shown else "") + (
            f"\n**FATAL:** {self.fatal}\n" if self.fatal else "")


def row_problems(pair: Pair, cfg: GPTConfig, encode) -> list[tuple[str, str]]:
    """Every problem of one pair as (check, detail); empty when the pair is usable."""
    found = []
    try:
        ids = load_npy(pair.text_ids_path, pair)
        codes = load_npy(pair.codes_path, pair)
        cond = load_npy(pair.condition_path, pair)
        emo = load_npy(pair.emo_vec_path, pair)
    except FidelError as exc:
        return [("files_load", str(exc))]
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        found.append(("text_ids_dtype", f"{pair.text_ids_path.name}: {ids.dtype} {ids.shape}, want 1-D integers"))
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        found.append(("codes_dtype", f"{pair.codes_path.name}: {codes.dtype} {codes.shape}, want 1-D integers"))
    if cond.shape != (cfg.condition_num_latent, cfg.model_dim) or not np.issubdtype(cond.dtype, np.floating):
        found.append(("condition_shape", f"{pair.condition_path.name}: {cond.dtype} {cond.shape}, want "
                                         f"float [{cfg.condition_num_latent}, {cfg.model_dim}]"))
    if emo.reshape(-1).shape != (cfg.model_dim,) or not np.issubdtype(emo.dtype, np.floating):
        found.append(("emo_vec_shape", f"{pair.emo_vec_path.name}: {emo.dtype} {emo.shape}, want [{cfg.model_dim}]"))
    if found:
        return found
    if len(ids) == 0:
        found.append(("empty_text", "no text ids"))
    if len(ids) != pair.text_len:
        found.append(("text_len", f"manifest says {pair.text_len}, file has {len(ids)}"))
    if len(codes) != pair.code_len:
        found.append(("code_len", f"manifest says {pair.code_len}, file has {len(codes)}"))
    codebook = cfg.number_mel_codes - 2
    if len(codes) and (codes.min() < 0 or codes.max() >= codebook):
        found.append(("codes_range", f"codes span {codes.min()}..{codes.max()}, codebook is 0..{codebook - 1}"))
    if len(ids) and (ids.min() < 0 or ids.max() >= cfg.number_text_tokens):
        found.append(("text_ids_range", f"ids span {ids.min()}..{ids.max()}, vocabulary is {cfg.number_text_tokens}"))
    if (ids == UNK_ID).any():
        found.append(("unk", f"{int((ids == UNK_ID).sum())} <unk> ids"))
    if len(ids) > cfg.max_text_tokens:
        found.append(("text_too_long", f"{len(ids)} ids > max_text_tokens {cfg.max_text_tokens}"))
    if len(codes) > cfg.max_mel_tokens:
        found.append(("codes_too_long", f"{len(codes)} codes > max_mel_tokens {cfg.max_mel_tokens}"))
    if pair.text and encode is not None and list(encode(pair.text)) != ids.tolist():
        found.append(("stale_text_ids", "stored ids differ from the text re-tokenised with this tokenizer"))
    if not pair.text.strip():
        found.append(("empty_text", "target_text is empty"))
    return found


def check_manifests(specs: list[str], cfg: GPTConfig, encode=None, max_bad_rows: float = 0.05,
                    min_script_share: float | None = None) -> tuple[DataReport, list[Pair]]:
    """Check every pair; returns the report and the pairs kept."""
    pairs = [pair for spec in specs for pair in read_manifest(spec)]
    report = DataReport([str(s) for s in specs], len(pairs), 0)
    counts: Counter = Counter()
    kept = []
    for pair in pairs:
        found = row_problems(pair, cfg, encode)
        if min_script_share is not None and pair.text and script_share(pair.text) < min_script_share:
            found.append(("script_share", f"{script_share(pair.text):.2f} of letters in the target script"))
        for check, detail in found:
            counts[check] += 1
            report.problems.append(Problem(str(pair.manifest), pair.line, pair.id, check, detail))
        if not found:
            kept.append(pair)
    report.counts = dict(counts)
    report.kept = len(kept)
    report.speakers = len({p.speaker for p in kept})
    bad_share = 1 - len(kept) / max(1, len(pairs))
    if not kept:
        report.fatal = "no usable pairs"
    elif bad_share > max_bad_rows:
        report.fatal = f"{len(pairs) - len(kept)} of {len(pairs)} pairs have problems ({bad_share:.1%} > " \
                       f"--max-bad-rows {max_bad_rows:.1%})"
    return report, kept


def write_clean_manifest(pairs: list[Pair], path: Path) -> Path:
    """The kept pairs as a paired JSONL manifest with absolute paths."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for p in pairs:
        lines.append(json.dumps({
            "id": p.id, "speaker": p.speaker, "language": p.language, "prompt_id": p.prompt_id,
            "target_id": p.target_id, "target_text": p.text,
            "target_text_ids_path": str(p.text_ids_path.resolve()), "target_text_len": p.text_len,
            "target_codes_path": str(p.codes_path.resolve()), "target_code_len": p.code_len,
            "prompt_condition_path": str(p.condition_path.resolve()), "prompt_condition_len": 32,
            "prompt_emo_vec_path": str(p.emo_vec_path.resolve()), "target_duration": p.duration,
        }, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
