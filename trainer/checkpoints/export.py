"""`fidel export`: a fidel checkpoint + its base → an upstream-loadable `gpt.pth`, tokenizer and config.yaml.

gpt.pth is a plain state_dict with the base file's keys in its order; only the three text tensors grow to
N+1 rows. After writing, the file is read back and checked: keys, order and shapes, and (float32) base rows
and pass-through tensors byte-identical to the base file. A failed check removes what was written.

With a release folder (`--release DIR`, the official IndexTTS2 folder) the export is a complete model folder:
every other file of the release is hard-linked (copied across file systems), never changed, its sha256 in
fidel.json, so `IndexTTS2(model_dir=out)` loads it as it is. The release folder is only ever read.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.files import atomic_write_bytes, atomic_write_json, disk_problem
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.config import load_gpt_config, read_config_yaml, write_config_yaml
from fidel_tts.trainer.model.gpt import upstream_state_dict
from fidel_tts.trainer.model.weights import (
    export_problems,
    export_state_dict,
    layout_problems,
    load_base_checkpoint,
    model_base_rows_hash,
    read_state_dict,
    training_shapes,
)
from fidel_tts.trainer.training.build import build_model, load_trainable
from fidel_tts.trainer.training.checkpoint import load_checkpoint
from fidel_tts.trainer.training.options import TrainConfig

EXPORT_FILES = ("gpt.pth", "bpe.model", "config.yaml", "export.json")
MODEL_RECORD = "fidel.json"
NORMALISER = "fidel_tts.trainer.text.normalize.normalize_text (FidelTextTokenizer)"


@dataclass
class Exported:
    folder: Path
    gpt: Path
    tokenizer: Path
    config: Path
    record: dict


def write_export(weights: dict[str, torch.Tensor], out: Path, tokenizer: str | Path, config: str | Path,
                 number_text_tokens: int) -> tuple[Path, Path, Path]:
    """gpt.pth, bpe.model and config.yaml (number_text_tokens updated) into out; refuses to overwrite. A write
    the disk refuses (full, read-only) removes what this export wrote and is one line saying so."""
    check_export_dir(out)
    targets = [out / name for name in EXPORT_FILES]
    remove_stale_temp_files(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(targets[0], lambda h: torch.save(weights, h))
        shutil.copyfile(tokenizer, targets[1])
        write_config_yaml(read_config_yaml(config), targets[2], number_text_tokens)
    except (OSError, FidelError) as exc:
        problem = exc.problem if isinstance(exc, FidelError) else disk_problem(out, exc)
        remove_export(out)
        if problem is None:
            raise
        raise FidelError(out, f"export not written, nothing kept: {problem}") from None
    return targets[0], targets[1], targets[2]


def check_export_dir(out: Path) -> None:
    """A folder, and none of the export's files in it: nothing is ever overwritten."""
    if out.exists() and not out.is_dir():
        raise FidelError(out, "--out is a file, not a folder")
    taken = [name for name in EXPORT_FILES if (out / name).exists()]
    if taken:
        unfinished = "" if (out / "export.json").exists() else " (no export.json: an interrupted export?)"
        raise FidelError(out, f"already holds {', '.join(taken)}{unfinished}; choose an empty folder")


def remove_export(out: Path) -> None:
    for path in (out / name for name in (*EXPORT_FILES, MODEL_RECORD)):
        if path.is_file():  # unlink of a missing file on a read-only disk is EROFS, not ENOENT
            path.unlink()


def remove_stale_temp_files(out: Path) -> None:
    """Hidden temp files of an export that was killed mid-write (atomic_write_bytes names them .NAME.*.tmp)."""
    if out.is_dir():
        for name in EXPORT_FILES:
            for stale in out.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)


def check_recorded_inputs(tc: TrainConfig, lineage: dict) -> None:
    """The tokenizer and config an export ships must be the files this lineage trained with (by sha256)."""
    for name, key in (("tokenizer", "tokenizer_sha256"), ("config", "config_sha256")):
        path, recorded = Path(getattr(tc, name)), lineage.get(key)
        if not path.is_file():
            raise FidelError(path, f"the {name} this lineage trained with is not found there (moved?)")
        if recorded and file_sha256(path) != recorded:
            raise FidelError(path, f"sha256 {file_sha256(path)[:12]} differs from the {name} this lineage trained "
                                   f"with ({recorded[:12]}): not its {name}; nothing exported")


def release_files(release: Path) -> list[Path]:
    """The release's files that the export keeps as they are (relative paths): all but the three it replaces."""
    return sorted(path.relative_to(release) for path in release.rglob("*")
                  if path.is_file() and path.relative_to(release).as_posix() not in EXPORT_FILES[:3])


def check_release(release: Path, out: Path) -> None:
    if not release.is_dir():
        raise FidelError(release, "--release is not a folder (the IndexTTS2 release folder: config.yaml, s2mel.pth …)")
    if out.resolve() == release.resolve() or out.resolve().is_relative_to(release.resolve()):
        raise FidelError(out, f"--out is inside --release {release}: the official folder is never written to")
    taken = [str(name) for name in release_files(release) if (out / name).exists()]
    if taken:
        raise FidelError(out, f"already holds {', '.join(taken[:3])} of the release; choose an empty folder")


def link_release(release: Path, out: Path) -> dict[str, str]:
    """Hard-link (or, across file systems, copy) each release file into out; {relative path: sha256}."""
    hashes = {}
    for name in release_files(release):
        source, target = release / name, out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        hashes[name.as_posix()] = file_sha256(target)
    return hashes


def remove_release_links(release: Path, out: Path) -> None:
    for name in release_files(release):
        if (out / name).is_file():
            (out / name).unlink()


def model_record(record: dict, release: Path, release_hashes: dict[str, str], out: Path) -> dict:
    return {
        "lineage": {key: record[key] for key in ("lineage_id", "checkpoint", "checkpoint_sha256", "step",
                                                  "base_checkpoint", "base_rows_sha256")},
        "release": str(release.resolve()), "release_files_sha256": release_hashes,
        "exported_sha256": {"gpt.pth": record["gpt_sha256"], "bpe.model": record["tokenizer_sha256"]},
        "number_text_tokens": record["number_text_tokens"],
        "normaliser": NORMALISER,
        "run": {"fidel": f"fidel speak --model {out} --text TEXT --prompt VOICE.wav --out OUT.wav",
                "python": f"tts = IndexTTS2(model_dir={str(out)!r}); tts.tokenizer = FidelTextTokenizer(tts.bpe_path)"},
    }


def complete_model_folder(exported: Exported, release: Path) -> None:
    """The release's other files and fidel.json beside the export; on any failure, nothing of it is kept."""
    out = exported.folder
    try:
        hashes = link_release(release, out)
        atomic_write_json(out / MODEL_RECORD, model_record(exported.record, release, hashes, out))
    except (OSError, FidelError) as exc:
        problem = exc.problem if isinstance(exc, FidelError) else disk_problem(out, exc)
        remove_release_links(release, out)
        remove_export(out)
        if problem is None:
            raise
        raise FidelError(out, f"export not written, nothing kept: {problem}") from None


def export_model(checkpoint: str | Path, out_dir: str | Path, fp16: bool = False,
                 base_checkpoint: str | Path | None = None, release: str | Path | None = None) -> Exported:
    """Write gpt.pth (upstream keys and order), bpe.model and config.yaml into out_dir; nothing is overwritten.

    base_checkpoint: where the base now lives, if it moved since training; its base rows must hash as recorded.
    release: the official IndexTTS2 folder; its other files join the export (see the module's docstring).
    """
    checkpoint, out = Path(checkpoint), Path(out_dir)
    check_export_dir(out)  # before any work
    if release is not None:
        check_release(Path(release), out)
    state, meta = load_checkpoint(checkpoint)
    tc = TrainConfig(**state["train_config"])
    if base_checkpoint is not None:
        tc = replace(tc, base_checkpoint=str(base_checkpoint))
    check_recorded_inputs(tc, state["lineage"])
    setup = build_model(tc)
    model = load_trainable(setup.model, state["model"])
    lineage = state["lineage"]
    if setup.base_hash != lineage["base_rows_sha256"]:
        raise FidelError(tc.base_checkpoint, "its base rows do not hash as this lineage's base did: not its base")
    if model_base_rows_hash(model) != lineage["base_rows_sha256"]:
        raise FidelError(checkpoint, f"base rows drifted from the base (trained with --freeze {tc.freeze}); "
                                     "an export must keep them bit-identical")
    dtype = torch.float16 if fp16 else torch.float32
    base = None
    if tc.base_checkpoint is None:
        weights = {k: v.to(dtype) for k, v in upstream_state_dict(model).items()}
    else:
        base = load_base_checkpoint(tc.base_checkpoint, load_gpt_config(tc.config), read_config_yaml(tc.config)["gpt"])
        weights = export_state_dict(model, base, dtype if fp16 else None)
    gpt, tokenizer, config = write_export(weights, out, tc.tokenizer, tc.config, setup.cfg.number_text_tokens)
    del weights
    written = read_state_dict(gpt)
    if base is None:
        problems = layout_problems(written, training_shapes(setup.cfg), dtype)
    else:
        problems = export_problems(written, base, setup.cfg.text_rows, dtype)
    del written
    if problems:
        remove_export(out)
        raise FidelError(gpt, f"export check failed, nothing kept: {'; '.join(problems[:4])}")
    record = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": meta["sha256"], "step": meta["step"],
        "lineage_id": lineage["id"], "base_checkpoint": tc.base_checkpoint,
        "base_rows_sha256": lineage["base_rows_sha256"], "dtype": str(dtype).removeprefix("torch."),
        "gpt_sha256": file_sha256(gpt), "tokenizer_sha256": file_sha256(tokenizer),
        "number_text_tokens": setup.cfg.number_text_tokens, "text_rows": setup.cfg.text_rows,
        "base_rows": setup.base_rows, "keys": len(base.key_order) if base else len(training_shapes(setup.cfg)),
        "freeze": tc.freeze, "init": lineage.get("init"),
        "checked": "keys, order and shapes as the base" + (
            "; base rows and pass-through tensors byte-identical" if base is not None and not fp16 else ""),
    }
    try:
        atomic_write_json(out / "export.json", record)
    except FidelError as exc:
        remove_export(out)
        raise FidelError(out, f"export not written, nothing kept: {exc.problem}") from None
    exported = Exported(out, gpt, tokenizer, config, record)
    if release is not None:
        complete_model_folder(exported, Path(release))
    return exported


def read_export_record(folder: str | Path) -> dict | None:
    path = Path(folder) / "export.json"
    return json.loads(path.read_text()) if path.is_file() else None
