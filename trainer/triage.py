"""Checkpoint triage: start fresh, resume, try the experimental repair, or refuse, from evidence in the files
(design.md §5). Reads fidel checkpoints and the community trainers' `{model, optimizer, scheduler, ...}` dicts
(AmV2, JarodMica, Ksuriuri, instavar), always with weights_only=True."""

from __future__ import annotations

import json
import pickletools
import zipfile
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from trainer.checkpoint import file_sha256, list_checkpoints, read_sidecar, verify_checkpoint
from trainer.errors import FidelError
from trainer.model import SPLIT_KEYS
from trainer.weights import base_rows_hash, read_state_dict, torch_load, upstream_keys_of

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
            from trainer.tokenizer import load_tokenizer

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

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        rows = "\n".join(f"| {Path(c.path).name} | {c.kind} | {c.step} | {c.finding or ('valid' if c.valid else 'invalid')}"
                         f" | {c.decision} | {c.detail} |" for c in self.candidates)
        table = ("| checkpoint | kind | step | finding | decision | evidence |\n|---|---|---|---|---|---|\n"
                 + (rows or "| (none) ||||||\n"))
        return f"**Decision: {self.action}**: {self.reason}\n\n{table}\n"


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


def row_drift(current: torch.Tensor, base: torch.Tensor) -> dict:
    """max |Δ|, rows changed, and whether the change is one uniform shrink (decoupled weight decay alone)."""
    cur, ref = current.float(), base.float()
    delta = (cur - ref).abs()
    per_row = delta.flatten(1).amax(1) if delta.ndim > 1 else delta
    changed = int((per_row > 0).sum())
    out = {"max_abs_delta": float(delta.max()) if delta.numel() else 0.0, "rows_changed": changed}
    if changed:
        nonzero = ref != 0
        ratio = cur[nonzero] / ref[nonzero]
        spread = float(ratio.max() - ratio.min())
        factor = float(ratio.mean())
        # weight decay multiplies every element by the same Π(1 − lr·wd); gradients move rows each their own way
        out["uniform_shrink"] = bool(spread < 1e-5 * max(1.0, abs(factor)) and factor < 1.0)
        out["shrink_factor"] = factor
    return out


def optimizer_param_names(model_state: dict, optimizer: dict) -> dict[int, str]:
    """Param id → name for an AdamW built from `model.parameters()`: the state_dict order minus buffers
    (reference/amv2_checkpoint_format.md §1). Ids whose moment shapes disagree with that mapping are dropped."""
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
    """Non-zero Adam moments on rows 0..B-1 of the text tensors: trained without the fix."""
    optimizer = raw.get("optimizer")
    if not isinstance(optimizer, dict):
        return {"optimizer": "absent"}
    mapping = optimizer_param_names(model_state, optimizer)
    if not mapping:
        return {"optimizer": "present, ids not mappable to names (a filtered-parameter optimizer?)"}
    by_name = {name: optimizer["state"].get(i) for i, name in mapping.items()}
    out = {"optimizer": "AdamW ids mapped by parameter order", "base_rows_nonzero": {}, "new_rows_with_moments": None}
    for key in SPLIT_KEYS:
        moments = by_name.get(key)
        if not moments:
            out["base_rows_nonzero"][key] = "no state (never had a gradient)"
            continue
        avg, sq = moments["exp_avg"], moments["exp_avg_sq"]
        base_nonzero = ((avg[:base_rows] != 0) | (sq[:base_rows] != 0))
        rows = int((base_nonzero.flatten(1).any(1) if base_nonzero.ndim > 1 else base_nonzero).sum())
        out["base_rows_nonzero"][key] = rows
        if key == "text_embedding.weight":
            new_sq = sq[base_rows:]
            out["new_rows_with_moments"] = int((new_sq.flatten(1) != 0).any(1).sum())
            out["new_rows"] = len(new_sq)
    counts = [v for v in out["base_rows_nonzero"].values() if isinstance(v, int)]
    out["any_base_moments"] = any(counts)
    return out


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
    from trainer.vocab import new_rows_init

    init = lineage.get("init") or {}
    new = model_state.get("text_embedding.new")
    if new is None or not init:
        return {}
    b = ref.base_rows
    base = ref.base
    tokenizer = None
    if init.get("method") == "subtoken" and ref.tokenizer_path:
        from trainer.tokenizer import load_tokenizer

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
        return Candidate(str(path), "fidel", False, None, exc.problem, "corrupt", "quarantine",
                         "does not verify: passed over, never loaded")
    expected = dict(lineage or {})
    if ref is not None:
        expected.setdefault("base_rows_sha256", ref.base_hash)
        if ref.tokenizer_sha256:
            expected.setdefault("tokenizer_sha256", ref.tokenizer_sha256)
    for key in ("base_rows_sha256", "tokenizer_sha256"):
        if expected.get(key) and meta.get(key) != expected[key]:
            return Candidate(str(path), "fidel", False, meta["step"], f"{key} differs from this run's",
                             "incompatible", "refuse", f"{key} differs: another lineage; start fresh in a new dir")
    evidence = {"integrity": {"sha256": meta["sha256"], "sidecar_sha256_match": True},
                "lineage_id": meta.get("lineage_id"), "base_rows_intact": meta.get("base_rows_intact"),
                "freeze": meta.get("freeze"), "total_steps": meta.get("schedule_total_steps")}
    detail = f"sha256 verified, lineage {str(meta.get('lineage_id'))[:8]}"
    if ref is not None:
        try:
            raw = torch_load(path, mmap=True)
        except FidelError as exc:
            return Candidate(str(path), "fidel", False, meta["step"], exc.problem, "corrupt", "quarantine",
                             "verifies but does not load")
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
    return Candidate(str(path), "fidel", True, meta["step"], detail, "fidel", decision, reason, evidence)


def foreign_candidate(path: Path, ref: Reference | None, policy: TriagePolicy | None = None) -> Candidate:
    """A community checkpoint: integrity, vocabulary, config, base-row drift, moments, step and scheduler."""
    policy = policy or TriagePolicy()
    ev: dict = {"integrity": integrity(path)}
    name = str(path)
    if ev["integrity"].get("sidecar_sha256_match") is False:
        return Candidate(name, "foreign", False, None, "sha256 does not match its sidecar", "corrupt", "quarantine",
                         "corrupt: sha256 differs from its recorded checksum; never loaded", ev)
    zip_test = ev["integrity"].get("zip_test", "ok")
    if zip_test != "ok":
        return Candidate(name, "foreign", False, None, f"zip test: {zip_test}", "corrupt", "quarantine",
                         "corrupt or truncated archive; never loaded", ev)
    try:
        raw = torch_load(path, mmap=True)
        state = upstream_keys_of(raw, path)
    except FidelError as exc:
        unsafe = unsafe_globals(path)
        ev["unsafe_globals"] = unsafe
        hostile = bool(unsafe) or (exc.problem.startswith("refused to load") and "global" in exc.problem.lower())
        detail = exc.problem + (f"; pickle imports {', '.join(unsafe[:3])}" if unsafe else "")
        return Candidate(name, "foreign", False, None, detail, "hostile" if hostile else "corrupt",
                         "refuse" if hostile else "quarantine",
                         ("refused: the pickle asks for code or objects beyond plain tensors; never unpickled"
                          if hostile else "unreadable or truncated; quarantine it"), ev)
    except Exception as exc:  # noqa: BLE001 - garbage bytes can break the unpickler in any way; report, never raise
        ev["unsafe_globals"] = unsafe_globals(path)
        if ev["unsafe_globals"]:
            return Candidate(name, "foreign", False, None, f"pickle imports {', '.join(ev['unsafe_globals'][:3])}",
                             "hostile", "refuse", "refused: the pickle asks for code; never unpickled", ev)
        return Candidate(name, "foreign", False, None, f"unreadable ({type(exc).__name__}: {str(exc)[:120]})",
                         "corrupt", "quarantine", "unreadable: not a checkpoint; quarantine it", ev)
    raw = raw if isinstance(raw, dict) else {}
    step = raw.get("step") if isinstance(raw.get("step"), int) else None
    ev["step"] = step
    ev["format"] = "community {model, optimizer, ...}" if "model" in raw else "plain state_dict"
    emb = state.get("text_embedding.weight")
    if emb is None or any(k not in state for k in SPLIT_KEYS):
        return Candidate(name, "foreign", False, step, "no text_embedding/text_head", "incompatible", "refuse",
                         "not a UnifiedVoice checkpoint", ev)
    rows = emb.shape[0]
    ev["vocab_rows"] = rows
    if ref is None:
        return Candidate(name, "foreign", True, step, f"{rows} text rows; no --base given: not judged",
                         "unverified", "fresh", "foreign checkpoint, no base to judge it against: not resumed", ev)
    if ref.tokenizer_pieces is not None:
        ev["tokenizer_rows_expected"] = ref.tokenizer_pieces + 1
        if rows != ref.tokenizer_pieces + 1:
            return Candidate(name, "foreign", False, step,
                             f"{rows} text rows, tokenizer has {ref.tokenizer_pieces} pieces (wants N+1 = "
                             f"{ref.tokenizer_pieces + 1})", "incompatible", "refuse",
                             "vocabulary rows do not match the tokenizer; start fresh in a new dir", ev)
    mismatched = [k for k, v in ref.base.items() if k not in SPLIT_KEYS and k in state
                  and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in ref.base if k not in state]
    ev["config_match"] = not mismatched and not missing
    if mismatched or missing:
        what = ", ".join([f"{k} shape" for k in mismatched[:3]] + [f"{k} missing" for k in missing[:3]])
        return Candidate(name, "foreign", False, step, f"config differs: {what}", "incompatible", "refuse",
                         "model shape differs from the base config; start fresh in a new dir", ev)
    b = ref.base_rows
    ev["base_rows"] = b
    ev["drift"] = {k: row_drift(state[k][:b], ref.base[k][:b]) for k in SPLIT_KEYS}
    ev["moments"] = base_row_moments(raw, raw.get("model", state), b)
    ev["scheduler"] = scheduler_position(raw, step, policy.warmup_steps)
    drifted = [k for k, d in ev["drift"].items() if d["rows_changed"]]
    shrink_only = bool(drifted) and all(ev["drift"][k].get("uniform_shrink") for k in drifted)
    moments_on_base = bool(ev["moments"].get("any_base_moments"))
    max_delta = max(d["max_abs_delta"] for d in ev["drift"].values())
    rows_changed = ev["drift"]["text_embedding.weight"]["rows_changed"]
    sched = ev["scheduler"]
    lr = f"lr ×{sched['lr_ratio']:.3g} ({sched['phase']})" if sched.get("lr_ratio") is not None else "no scheduler"
    new_moved = ev["moments"].get("new_rows_with_moments")
    new_txt = f"; new rows with gradients {new_moved}/{ev['moments']['new_rows']}" if new_moved is not None else ""
    if drifted:
        factor = ev["drift"][drifted[0]].get("shrink_factor", 1.0)
        kind = f"weight-decay shrink ×{factor:.6f}" if shrink_only else "gradient drift"
        detail = (f"base rows drifted: {rows_changed}/{b} embedding rows, max abs Δ {max_delta:.3g} ({kind}); "
                  f"Adam moments on base rows: {'non-zero' if moments_on_base else 'zero'}; {lr}{new_txt}")
        finding = "broken"
        why = ("base rows drifted from the base (" + kind + ")"
               + ("; Adam moments on base rows are non-zero: trained without the fix" if moments_on_base else "")
               + f"; scheduler {sched.get('phase', 'unknown')}")
        if policy.policy == "experimental":
            decision, reason = "experimental", why + ": experimental repair (restore base rows, zero their moments) " \
                                                     "into a new dir, text-loss gate armed"
        elif policy.policy == "force-resume":
            decision, reason = "resume", why + ": resumed anyway (policy force-resume)"
        else:
            decision, reason = "fresh", why + ": do not resume a broken run; start fresh"
        return Candidate(name, "foreign", True, step, detail, finding, decision, reason, ev)
    detail = (f"base rows intact ({b} rows bit-identical); Adam moments on base rows: "
              f"{'non-zero' if moments_on_base else 'zero'}; {lr}{new_txt}")
    s = step or 0
    if policy.policy == "force-fresh":
        decision, reason = "fresh", "policy force-fresh"
    elif policy.policy == "force-resume" or s >= policy.resume_from:
        strength = "definitely " if s >= policy.definitely_from else ""
        decision = "resume"
        reason = (f"fixed run (base intact) at step {s} ≥ {policy.resume_from}: {strength}worth resuming"
                  if policy.policy != "force-resume" else f"fixed run at step {s}: resumed (policy force-resume)")
    elif s < policy.fresh_below:
        decision, reason = "fresh", f"fixed run (base intact) at step {s} < {policy.fresh_below}: little lost, start fresh"
    else:
        decision, reason = "fresh", (f"fixed run (base intact) at step {s}, between {policy.fresh_below} and "
                                     f"{policy.resume_from}: fresh is the safe default (--policy force-resume to keep it)")
    return Candidate(name, "foreign", True, step, detail, "fixed", decision, reason, ev)


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
        best = max(foreign_ok, key=lambda c: c.step or 0)
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
