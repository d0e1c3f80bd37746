"""The experimental policy (the guide's Option B) for a community checkpoint whose base rows drifted:

1. back it up, with its sha256 beside it (and check the copy);
2. restore rows 0..B-1 of text_embedding / text_head from the base checkpoint;
3. zero the Adam moments of those rows;
4. import the repaired state as a fidel checkpoint in a *new* output dir and resume from it, with the
   text-loss gate armed (text loss < threshold within N steps of the resume, else abort).

The imported run keeps the community run's step count, weights and Adam moments (new rows and backbone). Its
LR schedule restarts with warmup over the steps still to run (--max-steps − step), where the community trainer
itself would continue its cosine from the saved position. Why: the cosine's warmup and total are not stored
(only the lr it had reached, often near 0 at 38k), and the restored base rows and zeroed moments are a new start
for Adam: a warmup keeps its first updates small while exp_avg_sq refills.

Nothing is written before the source has loaded and been repaired in memory; if the backup or the import then
fails, what they created is removed. The backup keeps the source's permission bits.

A community run that triage calls fixed is resumed by the same import, without the backup or the gate
(`community_resume`, for `fidel train --resume FILE` and the flow): base rows restored to the base, the
schedule restarted with warmup, and a later run continues the imported lineage instead of importing again.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from fidel_tts.trainer.checkpoints.triage import Reference, optimizer_param_names, triage_path
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.evaluation.gates import GateConfig, validation_hook
from fidel_tts.trainer.files import atomic_write_bytes
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.gpt import SPLIT_KEYS, is_training_path_key, load_upstream_state_dict
from fidel_tts.trainer.model.weights import (
    model_base_rows_hash,
    read_state_dict,
    torch_load,
    upstream_keys_of,
)
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.training.build import build_model, lineage_of, resolve_resume
from fidel_tts.trainer.training.checkpoint import save_checkpoint
from fidel_tts.trainer.training.checkpointer import Checkpointer
from fidel_tts.trainer.training.hooks import TrainHooks, TrainResult
from fidel_tts.trainer.training.optim import make_optimizer, make_scheduler, param_groups
from fidel_tts.trainer.training.options import TrainConfig
from fidel_tts.trainer.training.step import Position
from fidel_tts.trainer.training.trainer import train

# fidel's split parameters ← rows B..N of the community tensors
SPLIT_SOURCES = {"text_embedding.new": "text_embedding.weight", "text_head.new_weight": "text_head.weight",
                 "text_head.new_bias": "text_head.bias"}


@dataclass
class Backup:
    path: Path
    sha256: str


def backup_checkpoint(path: str | Path, backup_dir: str | Path) -> Backup:
    """Copy the checkpoint into backup_dir with a `<name>.sha256` file; the copy is checked against the original.
    An existing backup is kept, never overwritten."""
    src, folder = Path(path), Path(backup_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    digest = file_sha256(src)
    if dst.exists():
        if file_sha256(dst) != digest:
            raise FidelError(dst, "a different file already has this backup's name: not overwritten")
    else:
        atomic_write_bytes(dst, lambda h: shutil.copyfileobj(open(src, "rb"), h))
        shutil.copymode(src, dst)
    if file_sha256(dst) != digest:
        raise FidelError(dst, "backup copy does not match the original's sha256")
    (folder / f"{src.name}.sha256").write_text(f"{digest}  {src.name}\n", encoding="utf-8")
    return Backup(dst, digest)


def repair_community_state(raw: dict, base: dict[str, torch.Tensor], base_rows: int,
                           restore_rows: bool = True) -> tuple[dict, dict]:
    """A copy of a community checkpoint dict with base rows restored from the base (unless restore_rows is False)
    and their Adam moments zeroed. Returns (repaired, record of what changed)."""
    repaired = copy.copy(raw)
    model = dict(raw["model"])
    record: dict = {"rows_restored": {}, "moments_zeroed": {}}
    for key in SPLIT_KEYS if restore_rows else ():
        current = model[key]
        changed = int((current[:base_rows] != base[key][:base_rows]).reshape(base_rows, -1).any(1).sum())
        fixed = current.clone()
        fixed[:base_rows] = base[key][:base_rows].to(fixed.dtype)
        model[key] = fixed
        record["rows_restored"][key] = changed
    repaired["model"] = model
    optimizer = raw.get("optimizer")
    if isinstance(optimizer, dict):
        mapping = optimizer_param_names(raw["model"], optimizer)
        state = {i: dict(s) for i, s in optimizer.get("state", {}).items()}
        for i, name in mapping.items():
            if name in SPLIT_KEYS and i in state:
                for moment in ("exp_avg", "exp_avg_sq"):
                    tensor = state[i][moment].clone()
                    record["moments_zeroed"][f"{name}.{moment}"] = int(
                        (tensor[:base_rows] != 0).reshape(base_rows, -1).any(1).sum())
                    tensor[:base_rows] = 0
                    state[i][moment] = tensor
        repaired["optimizer"] = {**optimizer, "state": state}
    return repaired, record


def imported_optimizer_state(model, optimizer: torch.optim.Optimizer, raw: dict, base_rows: int) -> dict:
    """fidel's optimizer state_dict, its moments taken by name from the community optimizer (new rows: B..N)."""
    saved = optimizer.state_dict()
    community = raw.get("optimizer")
    if not isinstance(community, dict):
        return saved
    mapping = optimizer_param_names(raw["model"], community)
    by_name = {name: community["state"].get(i) for i, name in mapping.items()}
    ids = {id(p): n for n, p in model.named_parameters()}
    index, state = 0, {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = ids[id(param)]
            source = by_name.get(SPLIT_SOURCES.get(name, name))
            if source and "exp_avg" in source:
                rows = slice(base_rows, None) if name in SPLIT_SOURCES else slice(None)
                avg, sq = source["exp_avg"][rows], source["exp_avg_sq"][rows]
                if avg.shape == param.shape:
                    state[index] = {"step": torch.as_tensor(source["step"], dtype=torch.float32).clone(),
                                    "exp_avg": avg.clone().to(param.dtype), "exp_avg_sq": sq.clone().to(param.dtype)}
            index += 1
    return {**saved, "state": state}


def base_with_run_rows(base_path: str | Path, run_state: dict, out_path: Path) -> Path:
    """A copy of the base checkpoint whose rows 0..B-1 of the text tensors are the community run's (the
    keep_base_rows option). fidel trains base rows frozen at its base's values and checks their hash, so keeping
    the rows a run left means making them the base of the new lineage."""
    base = read_state_dict(base_path)
    b = base["text_embedding.weight"].shape[0] - 1
    state = dict(base)
    for key in SPLIT_KEYS:
        rows = base[key].clone()
        rows[:b] = run_state[key][:b].to(rows.dtype)
        state[key] = rows
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, lambda handle: torch.save(state, handle))
    return out_path


def steps_left(raw: dict, tc: TrainConfig, source: str | Path) -> int:
    step = int(raw.get("step") or 0)
    if tc.max_steps is None or tc.max_steps <= step:
        raise FidelError(source, f"checkpoint is at step {step}: give --max-steps beyond it")
    return tc.max_steps - step


@contextmanager
def removed_on_failure(*paths: Path):
    """Whatever of `paths` did not exist before is removed again if the block fails: a refusal leaves nothing."""
    new = [p for p in paths if not p.exists()]
    try:
        yield
    except BaseException:
        for p in new:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
                p.with_name(p.name + ".sha256").unlink(missing_ok=True)
        raise


def import_community_checkpoint(raw: dict, tc: TrainConfig, source: str, note: dict | None = None) -> Path:
    """Write a community checkpoint dict (base rows equal to the base) as a fidel checkpoint at its step in
    tc.output_dir, so that `train(tc with resume=that path)` continues from it."""
    out = Path(tc.output_dir)
    setup = build_model(tc)
    model = setup.model
    state = {k: v for k, v in upstream_keys_of(raw, source).items() if is_training_path_key(k)}
    rows = state["text_embedding.weight"].shape[0]
    if rows != setup.cfg.text_rows:
        raise FidelError(source, f"{rows} text rows, but --tokenizer wants {setup.cfg.text_rows} (its pieces + 1): "
                                 "another vocabulary")
    load_upstream_state_dict(model, state)
    if model_base_rows_hash(model) != setup.base_hash:
        raise FidelError(source, "base rows differ from the base checkpoint: repair it first (--policy experimental)")
    step = int(raw.get("step") or 0)
    schedule_total = steps_left(raw, tc, source)  # the schedule restarts from warmup over the steps still to run
    lineage = lineage_of(tc, setup, Dist(), schedule_total)
    lineage["imported"] = {"from": str(source), "step": step, **(note or {})}
    cpu = torch.device("cpu")
    optimizer = make_optimizer(param_groups(model, tc.learning_rate, tc.new_rows_lr, tc.weight_decay), cpu)
    scheduler = make_scheduler(optimizer, tc, schedule_total)
    optimizer.load_state_dict(imported_optimizer_state(model, optimizer, raw, setup.base_rows))
    # the trainer's own checkpoint layout: what it saves is what it restores when training resumes from here
    checkpointer = Checkpointer(tc, Dist(), cpu, model, optimizer, scheduler,
                                torch.amp.GradScaler("cpu", enabled=False), lineage, tc.max_steps)
    at = Position(step)
    sidecar = checkpointer.sidecar("imported", at, [], base_intact=True)
    return save_checkpoint(out, step, checkpointer.state(at, [], None, 0), sidecar).path


@dataclass
class ExperimentalRun:
    backup: Backup
    repair: dict
    imported: Path
    gate: dict
    result: TrainResult


def experimental_resume(checkpoint: str | Path, tc: TrainConfig, text_loss_threshold: float = 3.0,
                        within_steps: int = 5000, hooks: TrainHooks | None = None,
                        on_gates: Callable[[int, list], None] = lambda step, results: None,
                        backup_dir: str | Path | None = None, keep_base_rows: bool = False) -> ExperimentalRun:
    """Option B: backup, restore base rows, zero their moments, resume into tc.output_dir (which must hold no
    checkpoint) with the validation gates and the text-loss gate armed; on_gates sees every gate result.

    keep_base_rows: keep rows 0..B-1 as the run left them (a fixed run's decay shrink) instead of restoring them;
    they become the new lineage's base, written to OUTPUT_DIR/base/gpt.pth (give that as --base-checkpoint when
    resuming this run later)."""
    path = Path(checkpoint)
    out = Path(tc.output_dir)
    resolve_resume(replace(tc, resume=None))  # refuses an output dir that already holds checkpoints
    if tc.base_checkpoint is None:
        raise FidelError(None, "the experimental policy needs --base-checkpoint (base rows come from it)")
    raw = torch_load(path)  # nothing is written before the source has loaded
    if not isinstance(raw, dict) or "model" not in raw:
        raise FidelError(path, "not a community {model, optimizer, ...} checkpoint")
    steps_left(raw, tc, path)
    base = upstream_keys_of(torch_load(tc.base_checkpoint), tc.base_checkpoint)
    base_rows = base["text_embedding.weight"].shape[0] - 1
    repaired, record = repair_community_state(raw, base, base_rows, restore_rows=not keep_base_rows)
    gate = {"threshold": text_loss_threshold, "by_step": int(raw.get("step") or 0) + within_steps}
    folder = Path(backup_dir) if backup_dir else out / "backup"
    with removed_on_failure(out, folder, folder / path.name):
        backup = backup_checkpoint(path, folder)
        if keep_base_rows:
            kept = base_with_run_rows(tc.base_checkpoint, upstream_keys_of(raw, path), out / "base" / "gpt.pth")
            tc = replace(tc, base_checkpoint=str(kept))
            record["base_rows"] = f"kept as the run left them: the new lineage's base is {kept}"
        imported = import_community_checkpoint(repaired, tc, str(backup.path),
                                               {"policy": "experimental", "repair": record,
                                                "backup_sha256": backup.sha256, "text_loss_gate": gate})
    lineage = torch_load(imported)["lineage"]
    config = GateConfig(base_rows_sha256=lineage["base_rows_sha256"] if tc.freeze == "split" else None,
                        text_loss_weight=tc.text_loss_weight, mel_loss_weight=tc.mel_loss_weight,
                        text_loss_threshold=text_loss_threshold, text_loss_by_step=gate["by_step"])
    hooks = hooks or TrainHooks()
    result = train(replace(tc, resume=str(imported)), replace(hooks, on_validation=validation_hook(config, on_gates)))
    return ExperimentalRun(backup, record, imported, gate, result)


# ----------------------------------------------------------------------------- resuming a fixed community run

NEXT_STEP = {"fresh": "; drop --resume to start fresh from the base",
             "experimental": "; `fidel experimental-resume` runs it behind the text-loss gate"}


def community_resume(tc: TrainConfig, path: Path, log: Callable[[str], None]) -> Path:
    """`--resume FILE` of a community checkpoint: triage it; a fixed run (untouched or decay-only base rows) is
    continued through continue_community, anything else stops with triage's reason before anything is written.
    A fixed run that triage would restart (younger than its resume threshold) is resumed: --resume asked for it."""
    if tc.base_checkpoint is None:
        raise FidelError(path, "--resume of a community checkpoint needs --base-checkpoint (triage judges its base "
                               "rows against it)")
    decision = triage_path(path, ref=Reference.load(tc.base_checkpoint, tc.tokenizer))
    candidate = decision.to_dict()["candidates"][0]
    if candidate["finding"] != "fixed":
        verdict = decision.refusal or decision.action  # refuse, quarantine or hostile; fresh or experimental
        raise FidelError(path, f"triage: {verdict}, not resumable: {candidate['reason']} ({candidate['detail']})"
                               + NEXT_STEP.get(verdict, ""))
    if decision.action != "resume":
        log(f"triage would start fresh ({candidate['reason']}); resumed because --resume names it")
    return continue_community(path, tc, candidate, log)


def earlier_import(tc: TrainConfig, source_sha256: str, log: Callable[[str], None]) -> Path | None:
    """The newest valid checkpoint in tc.output_dir, when its lineage was imported from the file with this sha256;
    None when it holds no checkpoint. A lineage of anything else is never continued in its place."""
    newest = resolve_resume(replace(tc, resume="auto"), log)
    if newest is None:
        return None
    imported = (torch_load(newest, mmap=True).get("lineage") or {}).get("imported") or {}
    if imported.get("source_sha256") != source_sha256:
        raise FidelError(tc.output_dir, f"already holds checkpoints of another lineage (newest {newest.name}), not imported "
                              "from this file: choose a new --output-dir, or --resume auto to continue them")
    return newest


def base_rows_note(record: dict, candidate: dict, base_rows: int, base_path: str) -> str:
    restored = record["rows_restored"]["text_embedding.weight"]
    if not any(record["rows_restored"].values()):
        return f"base rows already bit-identical to the base ({base_rows} rows): nothing to restore"
    shrink = next(c["ratio_median"] for c in candidate["evidence"]["change"].values() if "ratio_median" in c)
    return (f"base rows restored to the base: {restored}/{base_rows} embedding rows (weight decay had shrunk them to "
            f"×{shrink:.5f}) written back from {base_path}, their Adam moments zero; fidel trains them frozen")


def schedule_note(step: int, tc: TrainConfig, candidate: dict) -> str:
    reached = candidate["evidence"].get("scheduler", {}).get("lr_ratio")
    where = f" (its lr was at ×{reached:.3g} of the peak)" if reached is not None else ""
    return (f"LR schedule restarted over the {tc.max_steps - step} steps from {step} to {tc.max_steps}: "
            f"{tc.warmup_steps} warmup steps, then cosine; the community cosine's warmup and total steps are not "
            f"stored{where}")


def continue_community(path: Path, tc: TrainConfig, candidate: dict, log: Callable[[str], None]) -> Path:
    """The fidel checkpoint that continues community checkpoint `path` (triaged as `candidate`, a fixed run) in
    tc.output_dir: the newest checkpoint of an earlier import of the same file, else a new import at its step
    (base rows restored to the base, no repair: a fixed run's base-row moments are already zero). The source is
    only read."""
    out = Path(tc.output_dir)
    sha = candidate["evidence"]["integrity"]["sha256"]
    earlier = earlier_import(tc, sha, log)
    if earlier is not None:
        log(f"{path.name} was imported into {out} before: continuing that lineage from {earlier.name}")
        return earlier
    raw = torch_load(path, mmap=True)
    step = int(raw.get("step") or 0)
    steps_left(raw, tc, path)
    base = read_state_dict(tc.base_checkpoint)
    base_rows = base["text_embedding.weight"].shape[0] - 1
    restored, record = repair_community_state(raw, base, base_rows)
    note = {"policy": "resume", "source_sha256": sha, "triage": candidate["reason"],
            "base_rows": base_rows_note(record, candidate, base_rows, tc.base_checkpoint),
            "schedule": schedule_note(step, tc, candidate), "rows_restored": record["rows_restored"]}
    with removed_on_failure(out):
        imported = import_community_checkpoint(restored, tc, str(path.absolute()), note)
    log(f"imported {path.name} (step {step}) as {imported}; {note['base_rows']}; {note['schedule']}")
    return imported
