"""fidel checkpoints: atomic writes, a sidecar JSON that says what is inside, verified loads.

A checkpoint holds the trainable state only. Frozen base rows and pass-through tensors stay in the
base checkpoint and are referenced by their hash (docs/design.md §4).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.files import atomic_write_bytes, atomic_write_json
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.weights import torch_load

FORMAT = "fidel-checkpoint-v1"
NAME = re.compile(r"^ckpt-step(\d{8})\.pt$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": list(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class Saved:
    path: Path
    sidecar: dict


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt-step{step:08d}.pt"


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_checkpoint(folder: Path, step: int, state: dict, sidecar: dict) -> Saved:
    """state: everything to restore; sidecar: what a human or triage needs without loading it.

    A write the disk refuses leaves no half checkpoint, and says which checkpoint is the newest valid one."""
    path = checkpoint_path(folder, step)
    try:
        atomic_write_bytes(path, lambda h: torch.save({"format": FORMAT, **state}, h))
        meta = {"format": FORMAT, "file": path.name, "sha256": file_sha256(path), "size": path.stat().st_size,
                "step": step, **sidecar}
        atomic_write_json(sidecar_path(path), meta)
    except FidelError as exc:
        if path.is_file() and not sidecar_path(path).is_file():
            path.unlink()  # a checkpoint without its sidecar never verifies: do not leave one
        newest, _ = latest_valid_checkpoint(folder)
        raise FidelError(exc.path, f"{exc.problem}: checkpoint of step {step} not saved; newest valid checkpoint "
                                   f"{newest.name if newest else '(none)'} is intact") from None
    return Saved(path, meta)


def is_fidel_checkpoint(path: Path) -> bool:
    """Named ckpt-stepNNNNNNNN.pt, or with fidel's sidecar JSON; anything else is another trainer's file."""
    return bool(NAME.match(path.name)) or sidecar_path(path).is_file()


def list_checkpoints(folder: Path) -> list[Path]:
    """fidel checkpoints in a folder, newest step first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)), reverse=True)


def read_sidecar(path: Path) -> dict:
    if not path.is_file():
        raise FidelError(path, "checkpoint not found" if not path.exists() else "checkpoint is not a file")
    side = sidecar_path(path)
    if not side.is_file():
        raise FidelError(path, "no sidecar JSON: cannot verify this checkpoint")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FidelError(side, f"sidecar is not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise FidelError(side, f"unknown checkpoint format {meta.get('format')!r}")
    return meta


def verify_checkpoint(path: Path) -> dict:
    """The sidecar, after checking the file's sha256 against it. Never loads an unverified file."""
    meta = read_sidecar(path)
    actual = file_sha256(path)
    if actual != meta.get("sha256"):
        raise FidelError(path, f"sha256 {actual[:12]}… does not match its sidecar ({str(meta.get('sha256'))[:12]}…)")
    return meta


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    meta = verify_checkpoint(path)
    state = torch_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FidelError(path, "not a fidel checkpoint")
    return state, meta


def latest_valid_checkpoint(folder: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the (path, reason) of newer ones that did not."""
    rejected = []
    for path in list_checkpoints(folder):
        try:
            verify_checkpoint(path)
            return path, rejected
        except FidelError as exc:
            rejected.append((path, exc.problem))
    return None, rejected


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Temp files of writes a crash interrupted: never renamed into place, so never a checkpoint."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".ckpt-step") and p.name.endswith(".tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def prune_checkpoints(folder: Path, keep_last: int, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (at least the newest, and any in `keep`); returns what
    was deleted."""
    removed = []
    for path in list_checkpoints(folder)[max(1, keep_last):]:  # the newest always stays, even with keep_last 0
        if path in keep:
            continue
        path.unlink(missing_ok=True)
        sidecar_path(path).unlink(missing_ok=True)
        removed.append(path)
    return removed
