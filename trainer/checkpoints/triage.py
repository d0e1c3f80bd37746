"""Checkpoint triage: start fresh, resume, try the experimental repair, or refuse, from evidence in the files
(docs/design.md §5). Reads fidel checkpoints and the community trainers' `{model, optimizer, scheduler, ...}` dicts
(AmV2, JarodMica, Ksuriuri, instavar), always with weights_only=True."""

from __future__ import annotations

import json
import pickletools
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.markdown import bullets, escape, table
from fidel_tts.trainer.model.gpt import SPLIT_KEYS
from fidel_tts.trainer.model.vocab import new_rows_init
from fidel_tts.trainer.model.weights import base_rows_hash, read_state_dict, torch_load, upstream_keys_of
from fidel_tts.trainer.text.tokenizer import load_tokenizer
from fidel_tts.trainer.training.checkpoint import list_checkpoints, read_sidecar, verify_checkpoint

POLICIES = ("recommended", "experimental", "force-fresh", "force-resume")
FOREIGN_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
BUFFER_SUFFIXES = ("pos_enc.pe",)  # state_dict entries that are buffers, not optimizer params (reference §1)


@dataclass
class TriagePolicy:
    policy: str = "recommended"
    fresh_below: int = 5000  # a fixed foreign run younger than this: little lost, start fresh
    resume_from: int = 20000  # a fixed foreign run at least this old: resume
    definitely_from: int = 50000
    warmup_steps: int | None = None  # the community scheduler does not store it; give it to place the step
    text_loss_threshold: float = 3.0  # the guide's Option B check for a broken run resumed with the hooks

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise FidelError(None, f"--policy {self.policy!r}: choose from {', '.join(POLICIES)}")
        if not 0 <= self.fresh_below <= self.resume_from <= self.definitely_from:
            raise FidelError(None, "thresholds must satisfy fresh_below ≤ resume_from ≤ definitely_from")


@dataclass
class Reference:
    """What a candidate is judged against: the base checkpoint and the extended tokenizer."""

    base_path: str
    base: dict[str, torch.Tensor]  # upstream names
    base_rows: int  # B
    tokenizer_path: str | None = None
    tokenizer_pieces: int | None = None  # N; a compatible checkpoint has N+1 text rows
    tokenizer_sha256: str | None = None

    @classmethod
    def load(cls, base_path: str | Path, tokenizer_path: str | Path | None = None) -> Reference:
        base = read_state_dict(base_path)
        emb = base.get("text_embedding.weight")
        if emb is None:
            raise FidelError(base_path, "missing key text_embedding.weight: not a UnifiedVoice checkpoint")
        pieces = sha = None
        if tokenizer_path is not None:
            pieces, sha = load_tokenizer(tokenizer_path).get_piece_size(), file_sha256(tokenizer_path)
        return cls(str(base_path), base, emb.shape[0] - 1, None if tokenizer_path is None else str(tokenizer_path),
                   pieces, sha)

    @cached_property
    def base_hash(self) -> str:
        b = self.base
        return base_rows_hash(b["text_embedding.weight"], b["text_head.weight"], b["text_head.bias"], self.base_rows)


@dataclass
class Candidate:
    path: str
    kind: str  # fidel | foreign
    valid: bool
    step: int | None
    detail: str
    finding: str = ""  # corrupt | hostile | incompatible | broken | fixed | fidel | unverified
    decision: str = ""  # this candidate's own decision
    reason: str = ""
    evidence: dict = field(default_factory=dict)


@dataclass
class Decision:
    action: str  # fresh | resume | experimental | refuse
    checkpoint: str | None
    reason: str
    candidates: list[Candidate] = field(default_factory=list)
    policy: dict = field(default_factory=dict)

    @property
    def refusal(self) -> str | None:
        """Why nothing is usable: hostile (any candidate is), quarantine (all are corrupt), else refuse; None when
        the decision is usable (fresh, resume, experimental)."""
        if self.action != "refuse":
            return None
        findings = {c.finding for c in self.candidates}
        if "hostile" in findings:
            return "hostile"
        return "quarantine" if findings and findings <= {"corrupt"} else "refuse"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        """The decision and a narrow table; each candidate's evidence is in details_markdown."""
        rows = [[Path(c.path).name, c.kind, c.step, c.finding or ("valid" if c.valid else "invalid"), c.decision]
                for c in self.candidates] or [["(none)", "", "", "", ""]]
        return (f"**Decision: {escape(self.action)}**: {escape(self.reason)}\n\n"
                + table(["checkpoint", "kind", "step", "finding", "decision"], rows))

    def details_markdown(self) -> str:
        return bullets([(Path(c.path).name, c.detail) for c in self.candidates if c.detail])


# ----------------------------------------------------------------------------- evidence

def integrity(path: Path) -> dict:
    """sha256 (against a `<file>.sha256` or fidel sidecar when there is one) and the zip CRC test."""
    ev = {"sha256": file_sha256(path), "size": path.stat().st_size}
    for side in (path.with_name(path.name + ".sha256"), path.with_suffix(".json")):
        if side.is_file():
            try:
                text = side.read_text(encoding="utf-8").strip()
                expected = json.loads(text).get("sha256") if side.suffix == ".json" else text.split()[0]
            except (ValueError, AttributeError, IndexError, UnicodeDecodeError):
                expected = None
            if expected:
                ev["sidecar_sha256_match"] = expected == ev["sha256"]
                break
    ev["zip"] = zipfile.is_zipfile(path)
    if ev["zip"]:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            ev["zip_test"] = "ok" if bad is None else f"bad CRC in {bad}"
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            ev["zip_test"] = f"failed ({exc})"
    return ev


SAFE_GLOBAL_PREFIXES = ("torch.", "torch ", "collections OrderedDict", "collections.OrderedDict", "numpy", "_codecs encode",
                        "builtins set", "builtins frozenset")
STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING")


def pickle_globals(path: Path, limit: int = 1 << 26) -> list[str]:
    """The globals a pickle would import, read with pickletools (nothing is executed): the file itself, or the
    data.pkl of a torch zip archive. Stops quietly at the first byte it cannot parse."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member)[:limit] if member else b""
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit)
    except (OSError, zipfile.BadZipFile, EOFError, KeyError):
        return []
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in STRING_OPS:
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                found.append(str(arg).replace("\n", " "))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]} {strings[-1]}")
    except Exception:  # noqa: BLE001 - a truncated or garbage stream: keep what was read
        pass
    return found


def unsafe_globals(path: Path) -> list[str]:
    return sorted({g for g in pickle_globals(path) if not g.startswith(SAFE_GLOBAL_PREFIXES)})


UNIT_ROUNDOFF = 2.0 ** -24  # fp32 round-to-nearest: a product is within this relative error of the exact one
TINY = 1e-30  # below this (subnormals) a value/base ratio says nothing


def decay_floor(lr: float, weight_decay: float, steps: int) -> float:
    """The smallest value/base ratio AdamW's decoupled decay can leave after `steps` steps at learning rates ≤ lr:
    each step multiplies by the fp32 factor fl(1 − lr·wd) and rounds the product (relative error ≤ 2⁻²⁴). A factor
    that rounds to 1 (lr·wd < 2⁻²⁵, e.g. lr 5e-5 with wd 1e-5) changes nothing at all."""
    factor = float(torch.tensor(1 - lr * weight_decay, dtype=torch.float32))
    return 1.0 if factor == 1.0 or steps == 0 else (factor * (1 - UNIT_ROUNDOFF)) ** steps


def base_row_change(current: torch.Tensor, base: torch.Tensor, floor: float) -> dict:
    """Rows changed, max |Δ|, the value/base ratios of changed elements, and whether decay alone explains them:
    every changed element kept its sign, shrank (ratio ≤ 1) and by no more than the floor allows."""
    cur, ref = current.float(), base.float()
    changed = cur != ref
    rows = changed.flatten(1).any(1) if changed.ndim > 1 else changed
    out = {"rows_changed": int(rows.sum()), "max_abs_delta": float((cur - ref).abs().max()) if cur.numel() else 0.0}
    if not out["rows_changed"]:
        return out
    judged = changed & (ref.abs() > TINY)
    ratio = cur[judged].double() / ref[judged].double()
    out.update(ratio_min=float(ratio.min()), ratio_max=float(ratio.max()), ratio_median=float(ratio.median()),
               decay_floor=floor)
    out["within_decay"] = bool(ratio.min() >= floor and ratio.max() <= 1.0 and not (changed & (ref == 0)).any())
    return out


def optimizer_param_names(model_state: dict, optimizer: dict) -> dict[int, str]:
    """Param id → name for an AdamW built from `model.parameters()`: the state_dict order minus buffers
    (docs/design.md §8). Ids whose moment shapes disagree with that mapping are dropped."""
    names = [k for k in model_state if not k.endswith(BUFFER_SUFFIXES)]
    ids = [i for g in optimizer.get("param_groups", []) for i in g.get("params", [])]
    if len(ids) != len(names):
        return {}
    mapping = dict(zip(ids, names, strict=True))
    state = optimizer.get("state", {})
    for i, name in list(mapping.items()):
        moments = state.get(i)
        if moments and "exp_avg" in moments and tuple(moments["exp_avg"].shape) != tuple(model_state[name].shape):
            return {}
    return mapping


def base_row_moments(raw: dict, model_state: dict, base_rows: int) -> dict:
    """Per text tensor: base rows with non-zero exp_avg / exp_avg_sq, and its AdamW step count; the optimizer's
    peak lr (LambdaLR's initial_lr) and weight decay. Non-zero moments on base rows: gradients reached them."""
    optimizer = raw.get("optimizer")
    if not isinstance(optimizer, dict):
        return {"optimizer": "absent"}
    mapping = optimizer_param_names(model_state, optimizer)
    if not mapping:
        return {"optimizer": "present, ids not mappable to names (a filtered-parameter optimizer?)"}
    group = (optimizer.get("param_groups") or [{}])[0]
    by_name = {name: optimizer["state"].get(i) for i, name in mapping.items()}
    out = {"optimizer": "AdamW ids mapped by parameter order", "lr_peak": group.get("initial_lr", group.get("lr")),
           "weight_decay": group.get("weight_decay", 0.0), "base_rows": {}, "new_rows_with_moments": None}
    for key in SPLIT_KEYS:
        moments = by_name.get(key)
        if not moments:
            out["base_rows"][key] = {"exp_avg": 0, "exp_avg_sq": 0, "exp_avg_max": 0.0, "adam_steps": 0}  # no grad
            continue
        avg, sq = moments["exp_avg"], moments["exp_avg_sq"]
        out["base_rows"][key] = {"exp_avg": nonzero_rows(avg[:base_rows]), "exp_avg_sq": nonzero_rows(sq[:base_rows]),
                                 "exp_avg_max": float(avg[:base_rows].abs().max()) if base_rows else 0.0,
                                 "adam_steps": int(moments["step"])}
        if key == "text_embedding.weight":
            out["new_rows_with_moments"], out["new_rows"] = nonzero_rows(sq[base_rows:]), len(sq) - base_rows
    rows = out["base_rows"].values()
    out["any_base_moments"] = any(r["exp_avg"] or r["exp_avg_sq"] for r in rows)
    # exp_avg shrinks by β1 = 0.9 per zero-gradient step down to a few subnormal ulps (where 0.1·x rounds to 0 it
    # stays) within ~1000 steps; exp_avg_sq (β2 = 0.999) keeps a trace for tens of thousands of steps: gradients
    # reached the base rows, then stopped (the hooks were added later)
    out["hooks_added_later"] = out["any_base_moments"] and all(r["exp_avg_max"] < TINY for r in rows)
    return out


def nonzero_rows(tensor: torch.Tensor) -> int:
    nonzero = tensor != 0
    return int((nonzero.flatten(1).any(1) if nonzero.ndim > 1 else nonzero).sum())


def scheduler_position(raw: dict, step: int | None, warmup_steps: int | None) -> dict:
    sched = raw.get("scheduler")
    if not isinstance(sched, dict) or "last_epoch" not in sched:
        return {"scheduler": "absent"}
    base_lrs, last = sched.get("base_lrs") or [], sched.get("_last_lr") or []
    ratio = (last[0] / base_lrs[0]) if base_lrs and last and base_lrs[0] else None
    last_epoch = int(sched["last_epoch"])
    if warmup_steps is not None and last_epoch < warmup_steps:
        phase = "warmup"
    elif ratio is None:
        phase = "unknown"
    elif ratio >= 0.999:
        phase = "peak"
    else:
        phase = "decay"
    out = {"last_epoch": last_epoch, "lr_ratio": ratio, "phase": phase}
    if step is not None and last_epoch != step:
        out["note"] = f"last_epoch {last_epoch} ≠ step {step} (a fresh scheduler after a resume, or Accelerate)"
    return out


def new_row_movement_fidel(model_state: dict, lineage: dict, ref: Reference) -> dict:
    """Rows B..N against their recorded init (method and seed replayed from the base)."""
    init = lineage.get("init") or {}
    new = model_state.get("text_embedding.new")
    if new is None or not init:
        return {}
    b = ref.base_rows
    base = ref.base
    tokenizer = None
    if init.get("method") == "subtoken" and ref.tokenizer_path:
        tokenizer = load_tokenizer(ref.tokenizer_path)
    try:
        rows = new_rows_init(base["text_embedding.weight"][:b], base["text_head.weight"][:b],
                             base["text_head.bias"][:b], len(new), init["method"], init["seed"], tokenizer)
    except FidelError:
        return {}
    delta = (new.float() - rows.embedding.float()).abs().flatten(1).amax(1)
    return {"new_rows": len(new), "new_rows_moved": int((delta > 0).sum()), "new_rows_max_abs_delta": float(delta.max())}


# ----------------------------------------------------------------------------- classification

def fidel_candidate(path: Path, lineage: dict | None, ref: Reference | None = None,
                    policy: TriagePolicy | None = None) -> Candidate:
    policy = policy or TriagePolicy()
    try:
        meta = verify_checkpoint(path)
    except FidelError as exc:
        return Candidate(path=str(path), kind="fidel", valid=False, step=None, detail=exc.problem, finding="corrupt",
                         decision="quarantine", reason="does not verify: passed over, never loaded")
    expected = dict(lineage or {})
    if ref is not None:
        expected.setdefault("base_rows_sha256", ref.base_hash)
        if ref.tokenizer_sha256:
            expected.setdefault("tokenizer_sha256", ref.tokenizer_sha256)
    for key in ("base_rows_sha256", "tokenizer_sha256"):
        if expected.get(key) and meta.get(key) != expected[key]:
            return Candidate(path=str(path), kind="fidel", valid=False, step=meta["step"],
                             detail=f"{key} differs from this run's", finding="incompatible", decision="refuse",
                             reason=f"{key} differs: another lineage; start fresh in a new dir")
    evidence = {"integrity": {"sha256": meta["sha256"], "sidecar_sha256_match": True},
                "lineage_id": meta.get("lineage_id"), "base_rows_intact": meta.get("base_rows_intact"),
                "freeze": meta.get("freeze"), "total_steps": meta.get("schedule_total_steps")}
    detail = f"sha256 verified, lineage {str(meta.get('lineage_id'))[:8]}"
    if ref is not None:
        try:
            raw = torch_load(path, mmap=True)
        except FidelError as exc:
            return Candidate(path=str(path), kind="fidel", valid=False, step=meta["step"], detail=exc.problem,
                             finding="corrupt", decision="quarantine", reason="verifies but does not load")
        evidence["scheduler"] = scheduler_position(raw, meta["step"], (raw.get("train_config") or {}).get(
            "warmup_steps"))
        evidence["new_rows"] = new_row_movement_fidel(raw.get("model", {}), raw.get("lineage", {}), ref)
        moved = evidence["new_rows"]
        if moved:
            detail += f"; new rows moved {moved['new_rows_moved']}/{moved['new_rows']}"
        detail += f"; lr phase {evidence['scheduler'].get('phase')}"
    decision, reason = "resume", f"fidel lineage at step {meta['step']}, base hash matches"
    if policy.policy == "force-fresh":
        decision, reason = "fresh", "policy force-fresh"
    return Candidate(path=str(path), kind="fidel", valid=True, step=meta["step"], detail=detail, finding="fidel",
                     decision=decision, reason=reason, evidence=evidence)


@dataclass
class ForeignEvidence:
    """What one community checkpoint shows; gathered until the first problem that ends the look."""

    integrity: dict
    load_problem: str | None = None
    unsafe_globals: list[str] = field(default_factory=list)
    format: str = ""  # "training run" ({model, optimizer, ...}) or "weights only"
    step: int | None = None
    vocab_rows: int | None = None
    rows_expected: int | None = None
    shape_problem: str | None = None
    base_rows: int | None = None
    change: dict = field(default_factory=dict)  # per text tensor: base_row_change
    moments: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    last_text_loss: float | None = None

    @property
    def base_change(self) -> str:
        """untouched | decay | gradient: how rows 0..B-1 differ from the base."""
        if not any(c["rows_changed"] for c in self.change.values()):
            return "untouched"
        if self.moments.get("any_base_moments") is not False:  # non-zero, or no mappable optimizer to tell
            return "gradient"
        return "decay" if all(c.get("within_decay", True) for c in self.change.values()) else "gradient"

    @property
    def shrink(self) -> dict:
        emb = self.change.get("text_embedding.weight", {})
        return {k: emb[k] for k in ("ratio_min", "ratio_median", "ratio_max") if k in emb}


def gather_foreign(path: Path, ref: Reference | None, policy: TriagePolicy) -> ForeignEvidence:
    ev = ForeignEvidence(integrity=integrity(path))
    if ev.integrity.get("sidecar_sha256_match") is False or ev.integrity.get("zip_test", "ok") != "ok":
        return ev
    try:
        raw = torch_load(path, mmap=True)
        state = upstream_keys_of(raw, path)
    except Exception as exc:  # noqa: BLE001 - garbage bytes can break the unpickler in any way; report, never raise
        ev.load_problem = exc.problem if isinstance(exc, FidelError) else f"{type(exc).__name__}: {str(exc)[:120]}"
        ev.unsafe_globals = unsafe_globals(path)
        return ev
    raw = raw if isinstance(raw, dict) else {}
    ev.step = raw.get("step") if isinstance(raw.get("step"), int) else None
    ev.format = "training run" if "model" in raw and "optimizer" in raw else "weights only"
    losses = raw.get("last_losses")
    ev.last_text_loss = losses.get("text_loss") if isinstance(losses, dict) else None
    emb = state.get("text_embedding.weight")
    if emb is None or any(k not in state for k in SPLIT_KEYS):
        ev.shape_problem = "no text_embedding/text_head: not a UnifiedVoice checkpoint"
        return ev
    ev.vocab_rows = emb.shape[0]
    if ref is None:
        return ev
    if ref.tokenizer_pieces is not None:
        ev.rows_expected = ref.tokenizer_pieces + 1
        if ev.vocab_rows != ev.rows_expected:
            return ev
    mismatched = [k for k, v in ref.base.items() if k not in SPLIT_KEYS and k in state
                  and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in ref.base if k not in state]
    if mismatched or missing:
        ev.shape_problem = "config differs: " + ", ".join([f"{k} shape" for k in mismatched[:3]]
                                                          + [f"{k} missing" for k in missing[:3]])
        return ev
    b = ev.base_rows = ref.base_rows
    if ev.format == "weights only":
        ev.change = {k: base_row_change(state[k][:b], ref.base[k][:b], 1.0) for k in SPLIT_KEYS}
        return ev
    ev.moments = base_row_moments(raw, raw["model"], b)
    steps = {k: r["adam_steps"] for k, r in ev.moments.get("base_rows", {}).items()}
    lr, wd = ev.moments.get("lr_peak") or 0.0, ev.moments.get("weight_decay") or 0.0
    ev.change = {k: base_row_change(state[k][:b], ref.base[k][:b], decay_floor(lr, wd, steps.get(k, 0)))
                 for k in SPLIT_KEYS}
    ev.scheduler = scheduler_position(raw, ev.step, policy.warmup_steps)
    return ev


def evidence_line(ev: ForeignEvidence) -> str:
    """One line a user can check: what changed on the base rows, the moments, the schedule."""
    if ev.format == "weights only" and ev.base_rows is not None:
        rows = ev.change["text_embedding.weight"]["rows_changed"]
        return (f"weights only ({ev.vocab_rows} text rows, no optimizer, scheduler or step); base rows "
                + ("bit-identical" if not rows else f"changed: {rows}/{ev.base_rows} embedding rows"))
    m, b = ev.moments, ev.base_rows
    rows = ev.change["text_embedding.weight"]["rows_changed"]
    if ev.base_change == "untouched":
        head = f"base rows bit-identical ({b} rows)"
    elif ev.base_change == "decay":
        s = ev.shrink
        head = (f"base rows shrunk by weight decay alone: ×{s['ratio_median']:.5f} (per element "
                f"{s['ratio_min']:.5f}–{s['ratio_max']:.5f}; decay allows ≥ ×"
                f"{ev.change['text_embedding.weight']['decay_floor']:.5f} at lr ≤ {m['lr_peak']:.3g}, wd "
                f"{m['weight_decay']:.3g}, {m['base_rows']['text_embedding.weight']['adam_steps']} AdamW steps)")
    else:
        head = f"base rows moved by gradients: {rows}/{b} embedding rows, max |Δ| " \
               f"{max(c['max_abs_delta'] for c in ev.change.values()):.3g}"
    if "base_rows" in m:
        emb = m["base_rows"]["text_embedding.weight"]
        moments = ("zero" if not m["any_base_moments"] else
                   f"non-zero (exp_avg {emb['exp_avg']}, exp_avg_sq {emb['exp_avg_sq']} embedding rows)")
    else:
        moments = m.get("optimizer", "absent")
    sched = ev.scheduler
    lr = f"lr ×{sched['lr_ratio']:.3g} ({sched['phase']})" if sched.get("lr_ratio") is not None else "no scheduler"
    new = m.get("new_rows_with_moments")
    new_txt = f"; new rows with gradients {new}/{m['new_rows']}" if new is not None else ""
    return f"{head}; Adam moments on base rows: {moments}; {lr}{new_txt}"


def decide_broken(ev: ForeignEvidence, policy: TriagePolicy) -> tuple[str, str]:
    why = "base rows moved by gradients (trained without the fix)"
    if ev.moments.get("hooks_added_later"):
        loss = ev.last_text_loss
        why += ", later resumed with the hooks (base-row exp_avg decayed to subnormal, exp_avg_sq not)"
        if loss is not None and loss < policy.text_loss_threshold and policy.policy == "recommended":
            return "experimental", (f"{why}; the guide's Option B check passes: text loss {loss:.3g} < "
                                    f"{policy.text_loss_threshold}: continue behind the text-loss gate")
        if policy.policy == "recommended":
            seen = "no text loss recorded" if loss is None else f"text loss {loss:.3g} ≥ {policy.text_loss_threshold}"
            return "fresh", f"{why}; the guide's Option B check fails ({seen}): abort it, start fresh"
    if policy.policy == "experimental":
        return "experimental", why + ": experimental repair (restore base rows, zero their moments) into a new " \
                                     "dir, text-loss gate armed"
    if policy.policy == "force-resume":
        return "resume", why + ": resumed anyway (policy force-resume)"
    return "fresh", why + ": do not resume a broken run; start fresh"


BASE_ROWS_ON_RESUME = ("base rows restored to the base on import (fidel trains them frozen at the base's values; "
                       "the decay shrink is undone; `fidel experimental-resume --keep-base-rows` keeps them as the run left them)")


def decide_fixed(ev: ForeignEvidence, policy: TriagePolicy) -> tuple[str, str]:
    s = ev.step or 0
    kind = "untouched base rows" if ev.base_change == "untouched" else "base rows shrunk by weight decay only"
    if policy.policy == "force-fresh":
        return "fresh", "policy force-fresh"
    if policy.policy == "force-resume" or s >= policy.resume_from:
        strength = "definitely " if s >= policy.definitely_from else ""
        why = (f"fixed run ({kind}) at step {s}: resumed (policy force-resume)" if s < policy.resume_from else
               f"fixed run ({kind}) at step {s} ≥ {policy.resume_from}: {strength}resume")
        return "resume", why + ("; " + BASE_ROWS_ON_RESUME if ev.base_change == "decay" else "")
    if s < policy.fresh_below:
        return "fresh", f"fixed run ({kind}) at step {s} < {policy.fresh_below}: maybe restart, little lost"
    return "fresh", (f"fixed run ({kind}) at step {s}, between {policy.fresh_below} and {policy.resume_from}: fresh "
                     "is the safe default (--policy force-resume to keep it)")


WEIGHTS_ONLY = ("weights only: not a resumable run (no optimizer, scheduler or step); fidel train cannot warm-start "
                "from it: start fresh from the base, or resume the training checkpoint it was exported from")


@dataclass(frozen=True)
class Rule:
    """One row of the decision table: when it holds, the candidate gets this finding and decision."""

    holds: Callable[[ForeignEvidence], bool]
    finding: str
    decide: Callable[[ForeignEvidence, TriagePolicy], tuple[str, str]]
    valid: bool = False


FOREIGN_RULES = (
    Rule(lambda e: e.integrity.get("sidecar_sha256_match") is False, "corrupt",
         lambda e, p: ("quarantine", "corrupt: sha256 differs from its recorded checksum; never loaded")),
    Rule(lambda e: e.integrity.get("zip_test", "ok") != "ok", "corrupt",
         lambda e, p: ("quarantine", "corrupt or truncated archive; never loaded")),
    Rule(lambda e: bool(e.unsafe_globals), "hostile",
         lambda e, p: ("refuse", "refused: the pickle asks for code or objects beyond plain tensors; never unpickled")),
    Rule(lambda e: "Unsupported global" in (e.load_problem or ""), "incompatible",
         lambda e, p: ("refuse", "holds objects the load allowlist does not admit (named in the evidence); never "
                                 "unpickled")),
    Rule(lambda e: e.load_problem is not None, "corrupt",
         lambda e, p: ("quarantine", "unreadable or truncated; quarantine it")),
    Rule(lambda e: e.vocab_rows is None, "incompatible", lambda e, p: ("refuse", "not a UnifiedVoice checkpoint")),
    Rule(lambda e: e.rows_expected is not None and e.vocab_rows != e.rows_expected, "incompatible",
         lambda e, p: ("refuse", "vocabulary rows do not match the tokenizer; start fresh in a new dir")),
    Rule(lambda e: e.shape_problem is not None, "incompatible",
         lambda e, p: ("refuse", "model shape differs from the base config; start fresh in a new dir")),
    Rule(lambda e: e.base_rows is None, "unverified",
         lambda e, p: ("fresh", "foreign checkpoint, no base to judge it against: not resumed"), valid=True),
    Rule(lambda e: e.format == "weights only", "weights-only", lambda e, p: ("fresh", WEIGHTS_ONLY), valid=True),
    Rule(lambda e: e.base_change == "gradient", "broken", decide_broken, valid=True),
    Rule(lambda e: True, "fixed", decide_fixed, valid=True),
)


def foreign_detail(ev: ForeignEvidence) -> str:
    if ev.integrity.get("sidecar_sha256_match") is False:
        return "sha256 does not match its sidecar"
    if ev.integrity.get("zip_test", "ok") != "ok":
        return f"zip test: {ev.integrity['zip_test']}"
    if ev.load_problem is not None:
        return ev.load_problem + (f"; pickle imports {', '.join(ev.unsafe_globals[:3])}" if ev.unsafe_globals else "")
    if ev.shape_problem is not None:
        return ev.shape_problem
    if ev.rows_expected is not None and ev.vocab_rows != ev.rows_expected:
        return (f"{ev.vocab_rows} text rows, tokenizer has {ev.rows_expected - 1} pieces (wants N+1 = "
                f"{ev.rows_expected})")
    if ev.base_rows is None:
        return f"{ev.vocab_rows} text rows; no --base given: not judged"
    return evidence_line(ev)


def foreign_candidate(path: Path, ref: Reference | None, policy: TriagePolicy | None = None) -> Candidate:
    """A community checkpoint: gather the evidence, then the first rule of the decision table that holds."""
    policy = policy or TriagePolicy()
    ev = gather_foreign(path, ref, policy)
    rule = next(r for r in FOREIGN_RULES if r.holds(ev))
    decision, reason = rule.decide(ev, policy)
    return Candidate(path=str(path), kind="foreign", valid=rule.valid, step=ev.step, detail=foreign_detail(ev),
                     finding=rule.finding, decision=decision, reason=reason,
                     evidence=asdict(ev) | {"base_change": ev.base_change if ev.change else None})


def foreign_files(folder: Path) -> list[Path]:
    fidel = set(list_checkpoints(folder))
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix in FOREIGN_SUFFIXES and p not in fidel),
                  key=lambda p: p.name)


def decide(candidates: list[Candidate], folder: Path, policy: TriagePolicy) -> Decision:
    """fidel lineage first (newest valid), else the most advanced loadable foreign checkpoint's own decision."""
    pol = asdict(policy)
    if not candidates:
        return Decision("fresh", None, f"no checkpoint in {folder}", candidates, pol)
    fidel_ok = [c for c in candidates if c.kind == "fidel" and c.valid]
    fidel_all = [c for c in candidates if c.kind == "fidel"]
    if fidel_ok:
        newest = fidel_ok[0]
        skipped = fidel_all[:fidel_all.index(newest)]
        note = f"; passed over {len(skipped)} newer invalid checkpoint(s)" if skipped else ""
        if newest.decision == "fresh":
            return Decision("fresh", None, newest.reason, candidates, pol)
        return Decision("resume", newest.path, f"fidel lineage at step {newest.step}{note}", candidates, pol)
    foreign_ok = [c for c in candidates if c.kind == "foreign" and c.valid]
    if foreign_ok:
        best = max(foreign_ok, key=lambda c: (c.finding != "weights-only", c.step or 0))
        chosen = best.path if best.decision in ("resume", "experimental") else None
        return Decision(best.decision, chosen, f"{Path(best.path).name}: {best.reason}", candidates, pol)
    bad = candidates[0]
    return Decision("refuse", None, f"{len(candidates)} checkpoint(s) in {folder}, none usable ({Path(bad.path).name}: "
                                    f"{bad.reason or bad.detail}); move them aside or choose a new output dir",
                    candidates, pol)


def triage_output_dir(output_dir: str | Path, lineage: dict | None = None, ref: Reference | None = None,
                      policy: TriagePolicy | None = None, include_foreign: bool = False) -> Decision:
    """No checkpoint: fresh. Newest fidel checkpoint that verifies: resume; newer broken ones are passed over.
    include_foreign: also judge the other checkpoint files in the folder (community trainers' output dirs)."""
    policy = policy or TriagePolicy()
    folder = Path(output_dir)
    candidates = [fidel_candidate(p, lineage, ref, policy) for p in list_checkpoints(folder)]
    if include_foreign and folder.is_dir():
        candidates += [foreign_candidate(p, ref, policy) for p in foreign_files(folder)]
    return decide(candidates, folder, policy)


def triage_path(path: str | Path, lineage: dict | None = None, ref: Reference | None = None,
                policy: TriagePolicy | None = None) -> Decision:
    """Triage a folder (a fidel or community output dir) or one checkpoint file."""
    policy = policy or TriagePolicy()
    path = Path(path)
    if path.is_dir():
        return triage_output_dir(path, lineage, ref, policy, include_foreign=True)
    if not path.exists():
        if path.suffix in FOREIGN_SUFFIXES:
            raise FidelError(path, "no such checkpoint")
        return Decision("fresh", None, f"no checkpoint in {path} (a new output dir)", [], asdict(policy))
    try:
        read_sidecar(path)
        is_fidel = True
    except FidelError:
        is_fidel = False
    candidate = fidel_candidate(path, lineage, ref, policy) if is_fidel else foreign_candidate(path, ref, policy)
    if not candidate.valid:
        return Decision("refuse", None, f"{path.name}: {candidate.reason or candidate.detail}", [candidate],
                        asdict(policy))
    chosen = str(path) if candidate.decision in ("resume", "experimental") else None
    return Decision(candidate.decision, chosen, f"{path.name}: {candidate.reason}", [candidate], asdict(policy))
