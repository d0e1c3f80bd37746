"""Data checks on paired manifests, before any GPU money is spent (docs/design.md §3).

Fatal problems stop the flow: a missing or unreadable manifest, schema errors (FidelError while reading),
no pair in the target script, a split left empty, or more bad rows than `max_bad_rows` (a fraction). Row
problems drop the row and are listed with manifest, line, pair id and problem. Stale text ids are repaired,
not dropped: the dataset always holds ids re-tokenised from the text with the verified tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
from fidel_tts.trainer.data.manifest import FRAME_RATE, Pair, read_manifest, read_npy, split_manifest_spec
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.markdown import bullets, escape, table
from fidel_tts.trainer.model.config import GPTConfig, load_gpt_config
from fidel_tts.trainer.text.normalize import normalize_text, script_share
from fidel_tts.trainer.text.tokenizer import load_tokenizer

DROPPED, REPAIRED = "dropped", "repaired"
# check -> (action, what it means); the report lists them in this order
CHECKS: dict[str, tuple[str, str]] = {
    "missing_file": (DROPPED, "a feature file named by the manifest does not exist"),
    "bad_npy": (DROPPED, "a feature file is not a readable .npy array"),
    "wrong_dtype": (DROPPED, "ids/codes not integers, or conditioning/emotion vector not floats"),
    "wrong_shape": (DROPPED, "a feature array has the wrong shape for this config"),
    "non_finite": (DROPPED, "conditioning or emotion vector holds NaN or inf"),
    "fp16_overflow": (DROPPED, "conditioning or emotion vector beyond float16 range (--cond-dtype float16)"),
    "code_len_mismatch": (DROPPED, "target_code_len differs from the codes file"),
    "empty_codes": (DROPPED, "the codes file is empty"),
    "codes_out_of_range": (DROPPED, "codes outside 0 .. codebook-1"),
    "codes_too_long": (DROPPED, "more codes than the mel position table holds (max_mel_tokens)"),
    "padded_codes": (DROPPED, "codes longer than duration × 50, or tails identical across same-length targets: "
                              "padded by batched preprocessing"),
    "codes_short": (DROPPED, "fewer codes than duration × 50: codes and audio disagree"),
    "empty_text": (DROPPED, "target_text is empty"),
    "wrong_script": (DROPPED, "target text is not in the target script"),
    "unk": (DROPPED, "the re-tokenised text has <unk> ids"),
    "text_too_long": (DROPPED, "more text ids than the text position table holds (max_text_tokens)"),
    "stale_text_ids": (REPAIRED, "stored text ids differ from the text re-tokenised with this tokenizer; the "
                                 "dataset uses the re-tokenised ids"),
    "prompt_is_target": (DROPPED, "the prompt is the target utterance itself"),
    "cross_speaker": (DROPPED, "prompt and target are different speakers"),
    "duplicate": (DROPPED, "the same pair, or the same recording under another name, seen earlier"),
    "id_conflict": (DROPPED, "an id already used by a row with other content (text or feature files)"),
    "leakage": (DROPPED, "a validation target also in the training data"),
}
ROLES = ("text_ids", "codes", "condition", "emo_vec")
FP16_MAX = 65504.0


@dataclass(frozen=True)
class CheckSettings:
    max_bad_rows: float = 0.05
    min_script_share: float | None = 0.5  # None: no script checks
    script: str = "ethiopic"
    target_languages: tuple[str, ...] = ("am", "amh", "")  # "" : rows with no language are the target's
    duration_tolerance: float = 0.03  # relative, plus duration_slack frames
    duration_slack: int = 3
    tail_frames: int = 16  # a shared tail at least this long across same-length targets means padding
    min_duplicate_codes: int = 10  # shorter code sequences may coincide by chance
    cond_dtype: str = "float16"  # what the dataset stores; float16 adds the overflow check

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckContext:
    cfg: GPTConfig
    encode_many: Callable[[list[str]], list[list[int]]]
    tokenizer_path: str
    tokenizer_sha256: str
    settings: CheckSettings
    unk_id: int = 2

    @property
    def codebook(self) -> int:
        return min(self.cfg.start_mel_token, self.cfg.stop_mel_token)

    @classmethod
    def from_paths(cls, tokenizer: str | Path, config: str | Path, settings: CheckSettings | None = None
                   ) -> CheckContext:
        sp = load_tokenizer(tokenizer)
        cfg = load_gpt_config(config).with_text_tokens(sp.get_piece_size())

        def encode_many(normalised: list[str]) -> list[list[int]]:  # = trainer.text.tokenizer.encode, batched
            return sp.encode(normalised, out_type=int) if normalised else []

        return cls(cfg, encode_many, str(tokenizer), file_sha256(tokenizer), settings or CheckSettings(), sp.unk_id())


@dataclass
class Finding:
    split: str
    manifest: str
    line: int
    pair_id: str
    check: str
    action: str
    detail: str

    def text(self) -> str:
        return f"{self.manifest}:{self.line}: pair {self.pair_id}: {self.check}: {self.detail} [{self.action}]"


@dataclass
class RowFacts:
    """What the dataset-level checks and the report need of one row (the arrays themselves are not kept)."""

    text_len: int = 0  # re-tokenised
    code_len: int = 0
    duration: float | None = None
    codes_hash: bytes = b""
    tail: bytes = b""  # the last (up to) 64 codes as int32 bytes
    in_script: bool = True
    unk: int = 0


@dataclass
class RowArrays:
    """A usable row, as the dataset stores it."""

    text_ids: np.ndarray  # int32, re-tokenised
    codes: np.ndarray
    condition: np.ndarray  # [latents, dim]
    emo_vec: np.ndarray  # [dim]


class RowSink:
    """Receives every row that passed the row checks (dataset-level checks may still drop it)."""

    def add(self, split: str, index: int, pair: Pair, arrays: RowArrays) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- one row

def expected_shape(role: str, cfg: GPTConfig) -> str:
    return {"text_ids": "[n]", "codes": "[n]", "condition": f"[{cfg.condition_num_latent}, {cfg.model_dim}]",
            "emo_vec": f"[{cfg.model_dim}]"}[role]


def canonical(role: str, array: np.ndarray, cfg: GPTConfig) -> np.ndarray | None:
    """The array in the shape training uses (a leading batch axis of 1 is accepted), or None."""
    dims = 2 if role == "condition" else 1
    if array.ndim == dims + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != dims:
        return None
    if role == "condition" and array.shape != (cfg.condition_num_latent, cfg.model_dim):
        return None
    if role == "emo_vec" and array.shape != (cfg.model_dim,):
        return None
    return array


def load_feature(role: str, path: Path, ctx: CheckContext) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    try:
        array = read_npy(path)
    except FileNotFoundError:
        return None, ("missing_file", f"{role} file {path} not found")
    except (ValueError, OSError, EOFError) as exc:
        return None, ("bad_npy", f"{role} file {path} is not a readable .npy ({str(exc).splitlines()[0][:80]})")
    want_int = role in ("text_ids", "codes")
    kind_ok = np.issubdtype(array.dtype, np.integer) if want_int else np.issubdtype(array.dtype, np.floating)
    if not kind_ok:
        return None, ("wrong_dtype", f"{role} file {path.name} is {array.dtype}, want "
                                     f"{'integers' if want_int else 'floats'}")
    shaped = canonical(role, array, ctx.cfg)
    if shaped is None:
        return None, ("wrong_shape", f"{role} file {path.name} has shape {list(array.shape)}, want "
                                     f"{expected_shape(role, ctx.cfg)}")
    problem = None if want_int else float_problem(role, f"file {path.name}", shaped, ctx)
    return (None, problem) if problem else (shaped, None)


def float_problem(role: str, name: str, array: np.ndarray, ctx: CheckContext) -> tuple[str, str] | None:
    """A conditioning or emotion vector must be finite, and within float16 when the dataset stores float16."""
    if not np.isfinite(array).all():
        return "non_finite", f"{role} {name} holds NaN or inf"
    if ctx.settings.cond_dtype == "float16" and np.abs(array).max(initial=0.0) > FP16_MAX:
        return "fp16_overflow", (f"{role} {name} has |x| up to {np.abs(array).max():.3g}, beyond float16; build with "
                                 "--cond-dtype float32")
    return None


def audio_duration(path: Path | None) -> float | None:
    if path is None or not path.is_file():
        return None

    try:
        return float(soundfile.info(str(path)).duration)
    except RuntimeError:
        return None


def first_difference(a: list[int], b: list[int]) -> str:
    for k, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at {k}: stored {x}, now {y}"
    return f"stored {len(a)} ids, now {len(b)}"


@dataclass
class Tokens:
    """Re-tokenised text, once per distinct text."""

    ids: dict[str, np.ndarray]
    share: dict[str, float]

    @classmethod
    def of(cls, texts: set[str], ctx: CheckContext) -> Tokens:
        ordered = sorted(t for t in texts if t.strip())
        normalised = [normalize_text(t) for t in ordered]
        encoded = ctx.encode_many(normalised)
        ids = {t: np.asarray(e, dtype=np.int32) for t, e in zip(ordered, encoded, strict=True)}
        share = {t: script_share(n, ctx.settings.script) for t, n in zip(ordered, normalised, strict=True)}
        return cls(ids, share)


def text_problems(pair: Pair, ids: np.ndarray | None, share: float | None, stored: np.ndarray | None,
                  ctx: CheckContext, facts: RowFacts) -> list[tuple[str, str]]:
    """The target text and its ids: `ids` re-tokenised (None for a blank text), `stored` the ids file's."""
    cfg, settings = ctx.cfg, ctx.settings
    if ids is None:
        return [("empty_text", "target_text is missing or blank")]
    found = []
    facts.text_len = len(ids)
    if not len(ids):
        found.append(("empty_text", f"target_text {pair.text[:40]!r} normalises to no tokens"))
    if settings.min_script_share is not None and pair.language in settings.target_languages:
        facts.in_script = share >= settings.min_script_share
        if not facts.in_script:
            found.append(("wrong_script", f"{share:.0%} of letters in {settings.script} script "
                                          f"(min {settings.min_script_share:.0%}): {pair.text[:40]!r}"))
    facts.unk = int((ids == ctx.unk_id).sum())
    if facts.unk:
        found.append(("unk", f"{facts.unk} <unk> id(s) in the re-tokenised text: is this the verified tokenizer?"))
    if len(ids) > cfg.max_text_tokens:
        found.append(("text_too_long", f"{len(ids)} text ids > max_text_tokens {cfg.max_text_tokens}"))
    if stored is not None and (len(stored) != len(ids) or not np.array_equal(stored, ids)):
        found.append(("stale_text_ids", f"stored ids differ from the text re-tokenised with tokenizer "
                                        f"{ctx.tokenizer_sha256[:12]} ({first_difference(stored.tolist(), ids.tolist())})"))
    elif stored is not None and pair.text_len != len(stored):
        found.append(("stale_text_ids", f"target_text_len {pair.text_len} but the ids file holds {len(stored)}"))
    return found


def code_problems(pair: Pair, codes: np.ndarray, ctx: CheckContext, facts: RowFacts) -> list[tuple[str, str]]:
    """Range, lengths against the manifest, the position table and the clip's duration × 50."""
    settings, n = ctx.settings, len(codes)
    found = []
    facts.code_len = n
    facts.codes_hash = hashlib.blake2b(codes.astype(np.int32, copy=False).tobytes(), digest_size=16).digest()
    facts.tail = codes[-64:].astype(np.int32).tobytes()
    if n == 0:
        found.append(("empty_codes", f"codes file {pair.codes_path.name} is empty"))
    else:
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= ctx.codebook:
            found.append(("codes_out_of_range", f"codes span {low}..{high}, codebook is 0..{ctx.codebook - 1}"))
    if n != pair.code_len:
        found.append(("code_len_mismatch", f"target_code_len {pair.code_len} but {pair.codes_path.name} holds {n}"))
    if n > ctx.cfg.max_mel_tokens:
        found.append(("codes_too_long", f"{n} codes > max_mel_tokens {ctx.cfg.max_mel_tokens}"))
    if facts.duration is None:
        facts.duration = audio_duration(pair.target_audio_path)
    if facts.duration is not None and n:
        expected = facts.duration * FRAME_RATE
        slack = settings.duration_slack + settings.duration_tolerance * expected
        if n > expected + slack:
            found.append(("padded_codes", f"{n} codes for {facts.duration:.2f} s (≈{expected:.0f} at 50 Hz): "
                                          "padded to a longer clip by batched preprocessing?"))
        elif n < expected - slack:
            found.append(("codes_short", f"{n} codes for {facts.duration:.2f} s (≈{expected:.0f} at 50 Hz)"))
    return found


def inspect_pair(pair: Pair, ctx: CheckContext, tokens: Tokens) -> tuple[list[tuple[str, str]], RowFacts,
                                                                          RowArrays | None]:
    """Every row-level problem of one pair as (check, detail), its facts, and its arrays when usable."""
    found: list[tuple[str, str]] = []
    facts = RowFacts(duration=pair.duration)
    loaded: dict[str, np.ndarray] = {}
    for role, path in zip(ROLES, (pair.text_ids_path, pair.codes_path, pair.condition_path, pair.emo_vec_path),
                          strict=True):
        array, problem = load_feature(role, path, ctx)
        if problem:
            found.append(problem)
        else:
            loaded[role] = array
    ids = tokens.ids.get(pair.text)
    found += text_problems(pair, ids, tokens.share.get(pair.text), loaded.get("text_ids"), ctx, facts)
    if "codes" in loaded:
        found += code_problems(pair, loaded["codes"], ctx, facts)
    if pair.prompt_id and pair.prompt_id == pair.target_id:
        found.append(("prompt_is_target", f"prompt_id = target_id = {pair.target_id}"))
    elif pair.prompt_audio_path is not None and pair.prompt_audio_path == pair.target_audio_path:
        found.append(("prompt_is_target", f"prompt and target audio are both {pair.target_audio_path.name}"))
    usable = len(loaded) == len(ROLES) and not any(CHECKS[c][0] == DROPPED for c, _ in found)
    arrays = RowArrays(ids, loaded["codes"], loaded["condition"], loaded["emo_vec"]) if usable else None
    return found, facts, arrays


# ----------------------------------------------------------------------------- across rows

@dataclass
class Row:
    split: str
    index: int
    pair: Pair
    facts: RowFacts
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, detail: str, once: bool = False) -> None:
        if not (once and any(f.check == check for f in self.findings)):
            self.findings.append(Finding(self.split, str(self.pair.manifest), self.pair.line, self.pair.id, check,
                                         CHECKS[check][0], detail))

    @property
    def dropped(self) -> bool:
        return any(f.action == DROPPED for f in self.findings)


def norm(path: Path) -> str:
    return os.path.normpath(str(path))


def check_speakers(rows: list[Row]) -> None:
    """cross_speaker: the prompt's speaker, from prompt_speaker or from the rows where it is a target."""
    speaker_of: dict[str, str] = {}
    condition_of: dict[str, str] = {}
    for row in rows:
        p = row.pair
        if p.target_id and p.speaker:
            speaker_of.setdefault(p.target_id, p.speaker)
        if p.prompt_id:
            condition_of.setdefault(p.prompt_id, norm(p.condition_path))
            if p.prompt_speaker:
                speaker_of.setdefault(p.prompt_id, p.prompt_speaker)
    for row in rows:
        p = row.pair
        prompt_speaker = p.prompt_speaker or speaker_of.get(p.prompt_id, "")
        if prompt_speaker and p.speaker and prompt_speaker != p.speaker:
            row.add("cross_speaker", f"target speaker {p.speaker!r}, prompt {p.prompt_id or p.condition_path.name} "
                                     f"speaker {prompt_speaker!r}")
        own = condition_of.get(p.target_id)
        if own is not None and own == norm(p.condition_path) and p.prompt_id != p.target_id:
            row.add("prompt_is_target", f"prompt conditioning {p.condition_path.name} is the target's own",
                    once=True)


def check_duplicates(rows: list[Row], min_codes: int) -> None:
    """duplicate: the same (codes, conditioning) pair, or the same codes under another file, seen earlier."""
    seen_pair: dict[tuple[str, str], Row] = {}
    seen_codes: dict[bytes, tuple[str, Row]] = {}
    for row in rows:
        p, f = row.pair, row.facts
        key = (norm(p.codes_path), norm(p.condition_path))
        if key in seen_pair:
            row.add("duplicate", f"same target codes and prompt conditioning as {seen_pair[key].pair.where}")
            continue
        seen_pair[key] = row
        if f.codes_hash and f.code_len >= min_codes:
            first = seen_codes.setdefault(f.codes_hash, (key[0], row))
            if first[0] != key[0]:
                row.add("duplicate", f"codes identical to {Path(first[0]).name} ({first[1].pair.where}): the same "
                                     "recording twice")


def content_of(row: Row) -> dict:
    p = row.pair
    return {"target_text": p.text, "codes": norm(p.codes_path), "text ids": norm(p.text_ids_path),
            "conditioning": norm(p.condition_path), "emotion vector": norm(p.emo_vec_path),
            "codes content": row.facts.codes_hash}


def check_id_conflicts(rows: list[Row]) -> None:
    """id_conflict: two rows with one id and different content; which one a later lookup finds is a guess."""
    first: dict[str, Row] = {}
    for row in rows:
        seen = first.setdefault(row.pair.id, row)
        if seen is not row:
            differ = [k for k, v in content_of(row).items() if content_of(seen)[k] != v]
            if differ:
                row.add("id_conflict", f"id {row.pair.id!r} is also {seen.pair.where}, with other "
                                       f"{', '.join(differ)}")


def check_leakage(train: list[Row], val: list[Row], min_codes: int) -> None:
    paths = {norm(r.pair.codes_path): r for r in train}
    hashes = {r.facts.codes_hash: r for r in train if r.facts.codes_hash and r.facts.code_len >= min_codes}
    for row in val:
        hit = paths.get(norm(row.pair.codes_path)) or (hashes.get(row.facts.codes_hash)
                                                       if row.facts.code_len >= min_codes else None)
        if hit is not None:
            row.add("leakage", f"target {row.pair.target_id or row.pair.codes_path.name} is also a training target "
                               f"({hit.pair.where})")


def common_suffix(tails: list[bytes]) -> int:
    arrays = [np.frombuffer(t, dtype=np.int32) for t in tails]
    n = min(len(a) for a in arrays)
    k = 0
    while k < n and all(a[-1 - k] == arrays[0][-1 - k] for a in arrays):
        k += 1
    return k


def check_padded_tails(rows: list[Row], tail_frames: int) -> None:
    """Batched preprocessing stores every item at the batch's longest length: same code length, same padded
    tail. Group distinct recordings by (length, last `tail_frames` codes); a group of two or more is padding."""
    groups: dict[tuple[int, bytes], dict[bytes, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        f = row.facts
        if f.code_len > tail_frames and f.codes_hash:
            groups[(f.code_len, f.tail[-4 * tail_frames:])][f.codes_hash].append(row)
    for (length, _), by_content in groups.items():
        if len(by_content) < 2:
            continue
        shared = common_suffix([members[0].facts.tail for members in by_content.values()])
        example = next(iter(by_content.values()))[0].pair.codes_path.name
        for members in by_content.values():
            for row in members:
                row.add("padded_codes", f"the last {shared}{'+' if shared == 64 else ''} codes equal those of "
                                        f"{len(by_content) - 1} other target(s) of the same length {length} (e.g. "
                                        f"{example}): padded by batched preprocessing", once=True)


# ----------------------------------------------------------------------------- the report

@dataclass
class SplitSummary:
    pairs: int
    kept: int
    dropped: int
    repaired: int
    counts: dict[str, int]
    speakers: int
    pairs_per_speaker: dict[str, float]
    hours: float
    unk_rate: float
    no_duration: int


@dataclass
class DataReport:
    manifests: dict[str, list[str]]
    manifest_sha256: dict[str, str]
    tokenizer: str
    tokenizer_sha256: str
    settings: dict
    splits: dict[str, SplitSummary]
    findings: list[Finding]
    fatal: list[str]
    lengths: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    texts: dict[str, list[str]] = field(default_factory=dict, repr=False)
    kept: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # kept row indices per split

    @property
    def passed(self) -> bool:
        return not self.fatal

    def to_dict(self) -> dict:
        return {"passed": self.passed, "fatal": self.fatal, "manifests": self.manifests,
                "manifest_sha256": self.manifest_sha256, "tokenizer": self.tokenizer,
                "tokenizer_sha256": self.tokenizer_sha256, "settings": self.settings,
                "splits": {k: asdict(v) for k, v in self.splits.items()},
                "checks": {k: {"action": a, "meaning": m} for k, (a, m) in CHECKS.items()},
                "findings": len(self.findings)}

    def summary_lines(self) -> list[str]:
        lines = []
        for name, s in self.splits.items():
            lines.append(f"{name}: {s.kept} of {s.pairs} pairs kept ({s.dropped} dropped, {s.repaired} repaired), "
                         f"{s.speakers} speakers, {s.hours:.2f} h")
            for check, n in s.counts.items():
                lines.append(f"  {check}: {n} row(s) [{CHECKS[check][0]}]")
        lines += [f"FATAL: {f}" for f in self.fatal]
        return lines

    def to_markdown(self) -> str:
        """The verdict and narrow tables; what each check means and the row-level findings are in details_markdown."""
        verdict = "**PASSED**" if self.passed else "**FAILED**"
        out = [f"{verdict}: data checks on {escape(', '.join(f'{k}: {len(v)} manifest(s)' for k, v in self.manifests.items()))}, "
               f"tokenizer {escape(Path(self.tokenizer).name)} ({self.tokenizer_sha256[:12]}).", ""]
        out += [f"- **FATAL:** {escape(f)}" for f in self.fatal] + ([""] if self.fatal else [])
        names = list(self.splits)
        out.append(table(["split", "pairs", "kept", "dropped", "repaired", "speakers", "pairs/speaker min/median/max",
                          "hours", "<unk> rate", "no duration"],
                         [[name, s.pairs, s.kept, s.dropped, s.repaired, s.speakers,
                           "/".join(f"{s.pairs_per_speaker[k]:.0f}" for k in ("min", "median", "max")),
                           f"{s.hours:.2f}", f"{s.unk_rate:.4f}", s.no_duration] for name, s in self.splits.items()]))
        out.append(table(["check", "action", *names], [[check, action, *(self.splits[n].counts.get(check, 0)
                                                                         for n in names)]
                                                        for check, (action, _) in CHECKS.items()]))
        return "\n".join(out)

    def details_markdown(self, shown: int = 20) -> str:
        out = "What each check means:\n\n" + bullets([(check, meaning) for check, (_, meaning) in CHECKS.items()])
        if self.findings:
            out += f"\nFirst {min(shown, len(self.findings))} of {len(self.findings)} row-level findings:\n\n"
            out += "".join(f"- {escape(f.text())}\n" for f in self.findings[:shown])
        return out


def summarise(rows: list[Row]) -> SplitSummary:
    kept = [r for r in rows if not r.dropped]
    counts = Counter(check for r in rows for check in {f.check for f in r.findings})
    per_speaker = Counter(r.pair.speaker for r in kept)
    sizes = sorted(per_speaker.values()) or [0]
    tokens = sum(r.facts.text_len for r in rows)
    seconds = sum(r.facts.duration if r.facts.duration is not None else r.facts.code_len / FRAME_RATE for r in kept)
    return SplitSummary(
        pairs=len(rows), kept=len(kept), dropped=len(rows) - len(kept),
        repaired=sum(1 for r in kept if any(f.action == REPAIRED for f in r.findings)),
        counts={c: counts[c] for c in CHECKS if counts[c]}, speakers=len(per_speaker),
        pairs_per_speaker={"min": sizes[0], "median": float(statistics.median(sizes)), "max": sizes[-1]},
        hours=seconds / 3600, unk_rate=sum(r.facts.unk for r in rows) / max(1, tokens),
        no_duration=sum(1 for r in rows if r.facts.duration is None))


def fatal_problems(split_rows: dict[str, list[Row]], summaries: dict[str, SplitSummary], ctx: CheckContext
                   ) -> list[str]:
    settings = ctx.settings
    fatal = []
    train = split_rows.get("train", [])
    target = [r for r in train if r.pair.language in settings.target_languages]
    if settings.min_script_share is not None and train and not any(r.facts.in_script and r.facts.text_len
                                                                   for r in target):
        fatal.append(f"no training pair has {settings.script} text (min script share {settings.min_script_share:.0%}"
                     f" over {len(target)} target-language rows): is this the Amharic data, and is `::lang` right?")
    for name, s in summaries.items():
        if s.pairs and s.kept == 0:
            fatal.append(f"{name}: no usable pairs left ({s.pairs} all dropped)")
        elif s.pairs and s.dropped / s.pairs > settings.max_bad_rows:
            fatal.append(f"{name}: {s.dropped} of {s.pairs} pairs dropped ({s.dropped / s.pairs:.1%} > --max-bad-rows "
                         f"{settings.max_bad_rows:.1%})")
    return fatal


def run_checks(splits: dict[str, Sequence[str]], ctx: CheckContext, sink: RowSink | None = None) -> DataReport:
    """Check every pair of every split ("train", "val"); rows passing the row checks go to `sink` as read."""
    pairs = {name: [p for spec in specs for p in read_manifest(spec)] for name, specs in splits.items()}
    tokens = Tokens.of({p.text for ps in pairs.values() for p in ps}, ctx)
    split_rows: dict[str, list[Row]] = {}
    for name, split_pairs in pairs.items():
        rows = []
        for index, pair in enumerate(split_pairs):
            found, facts, arrays = inspect_pair(pair, ctx, tokens)
            row = Row(name, index, pair, facts)
            for check, detail in found:
                row.add(check, detail)
            if arrays is not None and sink is not None:
                sink.add(name, index, pair, arrays)
            rows.append(row)
        split_rows[name] = rows
    return checked_report(splits, split_rows, ctx)


def checked_report(splits: dict[str, Sequence[str]], split_rows: dict[str, list[Row]], ctx: CheckContext
                   ) -> DataReport:
    """The checks across rows (speakers, duplicates, leakage, padded tails) and the report of every split."""
    everything = [r for rows in split_rows.values() for r in rows]
    check_speakers(everything)
    check_id_conflicts(everything)
    for rows in split_rows.values():
        check_duplicates(rows, ctx.settings.min_duplicate_codes)
    if "train" in split_rows and "val" in split_rows:
        check_leakage(split_rows["train"], split_rows["val"], ctx.settings.min_duplicate_codes)
    check_padded_tails(everything, ctx.settings.tail_frames)

    summaries = {name: summarise(rows) for name, rows in split_rows.items()}
    report = DataReport(
        manifests={k: [str(s) for s in v] for k, v in splits.items()},
        manifest_sha256={str(s): file_sha256(split_manifest_spec(s)[0]) for specs in splits.values() for s in specs},
        tokenizer=ctx.tokenizer_path, tokenizer_sha256=ctx.tokenizer_sha256, settings=ctx.settings.to_dict(),
        splits=summaries, findings=[f for r in everything for f in r.findings],
        fatal=fatal_problems(split_rows, summaries, ctx))
    for name, rows in split_rows.items():
        kept = [r for r in rows if not r.dropped]
        report.kept[name] = np.array([r.index for r in kept], dtype=np.int64)
        report.texts[name] = [r.pair.text for r in kept]
        report.lengths[name] = {
            "duration_s": np.array([r.facts.duration for r in kept if r.facts.duration is not None], dtype=np.float64),
            "text_len": np.array([r.facts.text_len for r in kept], dtype=np.int64),
            "code_len": np.array([r.facts.code_len for r in kept], dtype=np.int64)}
    return report


TRAINING_FAULTS = ("empty_codes", "codes_out_of_range", "code_len_mismatch", "codes_too_long")


def text_id_problem(pair: Pair, ids: np.ndarray, cfg: GPTConfig) -> str | None:
    """Stored text ids as training embeds them: pieces of this tokenizer, never the start or stop token."""
    specials = (cfg.start_text_token, cfg.stop_text_token)
    bad = (ids < 0) | (ids >= cfg.number_text_tokens) | np.isin(ids, specials)
    if bad.any():
        return (f"text id {int(ids[bad][0])} at position {int(np.flatnonzero(bad)[0])} is outside this tokenizer's "
                f"pieces 0..{cfg.number_text_tokens - 1} or a start/stop token {specials}")
    if len(ids) != pair.text_len:
        return f"target_text_len {pair.text_len} but {pair.text_ids_path.name} holds {len(ids)} ids"
    if len(ids) > cfg.max_text_tokens:
        return f"{len(ids)} text ids > max_text_tokens {cfg.max_text_tokens}"
    return None


def training_pair_problem(pair: Pair, ctx: CheckContext) -> str | None:
    """The first problem that would stop or corrupt training on this pair: dtypes, shapes, ranges, lengths."""
    loaded = {}
    for role, path in zip(ROLES, (pair.text_ids_path, pair.codes_path, pair.condition_path, pair.emo_vec_path),
                          strict=True):
        loaded[role], problem = load_feature(role, path, ctx)
        if problem:
            return f"{problem[0]}: {problem[1]}"
    problem = text_id_problem(pair, loaded["text_ids"], ctx.cfg)
    if problem:
        return problem
    known = RowFacts(duration=-1.0)  # no audio read: duration checks find no training fault
    faults = [f"{c}: {d}" for c, d in code_problems(pair, loaded["codes"], ctx, known)
              if c in TRAINING_FAULTS]
    return faults[0] if faults else None


def check_training_pairs(pairs: Sequence[Pair], cfg: GPTConfig) -> None:
    """`fidel train` on JSONL: every pair checked before any step; the first bad one is one line, manifest:line."""
    ctx = CheckContext(cfg, lambda texts: [], "", "", CheckSettings(cond_dtype="float32"))
    for pair in pairs:
        problem = training_pair_problem(pair, ctx)
        if problem:
            raise FidelError(pair.where, f"pair {pair.id}: {problem} (`fidel data check` lists every problem)")


def check_manifests(splits: dict[str, Sequence[str]], tokenizer: str | Path, config: str | Path,
                    settings: CheckSettings | None = None) -> DataReport:
    """`fidel data check`: every check, nothing written."""
    return run_checks(splits, CheckContext.from_paths(tokenizer, config, settings))


# ----------------------------------------------------------------------------- report files

def write_problems(findings: list[Finding], path: Path) -> Path:
    """Row-level findings as a Parquet table (split, manifest, line, pair_id, check, action, detail)."""
    columns = {name: [getattr(f, name) for f in findings] for name in Finding.__dataclass_fields__}
    types = {"line": pa.int32()}
    table = pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_histograms(report: DataReport, folder: Path) -> list[Path]:
    """duration, text-length and code-length histograms of the kept pairs, one PNG each, splits overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label in (("duration_s", "target duration (s)"), ("text_len", "text ids per pair"),
                       ("code_len", "codes per pair (50 Hz)")):
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for split, lengths in report.lengths.items():
            values = lengths[key]
            if len(values):
                ax.hist(values, bins=50, alpha=0.6, label=f"{split} (n={len(values)})")
        ax.set_xlabel(label)
        ax.set_ylabel("pairs")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no values (no durations in the manifests)", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        path = folder / f"data_{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def write_report_files(report: DataReport, folder: Path, markdown: bool = True) -> list[Path]:
    """problems.parquet, the histograms and (unless the caller publishes them) data_check.md/.json."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [write_problems(report.findings, folder / "data_problems.parquet"), *write_histograms(report, folder)]
    if markdown:
        md, js = folder / "data_check.md", folder / "data_check.json"
        md.write_text(f"# data check\n\n{report.to_markdown()}\n## details\n\n{report.details_markdown()}", encoding="utf-8")
        js.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        written += [md, js]
    return written
