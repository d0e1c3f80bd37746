"""`fidel export`: a fidel checkpoint + its base → an upstream-loadable `gpt.pth`, tokenizer and config.yaml."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.checkpoint import atomic_write_bytes, atomic_write_json, file_sha256, load_checkpoint
from trainer.config import read_config_yaml, write_config_yaml
from trainer.errors import FidelError
from trainer.model import upstream_state_dict
from trainer.train import FROZEN_BUFFERS, TrainConfig, build_model
from trainer.weights import export_state_dict, load_base_checkpoint, model_base_rows_hash


@dataclass
class Exported:
    folder: Path
    gpt: Path
    tokenizer: Path
    config: Path
    record: dict


def export_model(checkpoint: str | Path, out_dir: str | Path, fp16: bool = False) -> Exported:
    """Write gpt.pth (upstream keys and order), bpe.model and config.yaml into out_dir; nothing is overwritten."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    state, meta = load_checkpoint(checkpoint)
    tc = TrainConfig(**state["train_config"])
    setup = build_model(tc)
    model = setup.model
    frozen = {k: v for k, v in model.state_dict().items() if k in FROZEN_BUFFERS}
    model.load_state_dict({**state["model"], **frozen})
    if model_base_rows_hash(model) != state["lineage"]["base_rows_sha256"]:
        raise FidelError(checkpoint, "base rows of the rebuilt model differ from the lineage's hash")
    dtype = torch.float16 if fp16 else None
    if tc.base_checkpoint is None:
        weights = upstream_state_dict(model)
        if dtype is not None:
            weights = {k: v.to(dtype) for k, v in weights.items()}
    else:
        weights = export_state_dict(model, load_base_checkpoint(tc.base_checkpoint, setup.cfg), dtype)
    targets = [out / "gpt.pth", out / "bpe.model", out / "config.yaml", out / "export.json"]
    taken = [p.name for p in targets if p.exists()]
    if taken:
        raise FidelError(out, f"already holds {', '.join(taken)}; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(targets[0], lambda h: torch.save(weights, h))
    shutil.copyfile(tc.tokenizer, targets[1])
    write_config_yaml(read_config_yaml(tc.config), targets[2], setup.cfg.number_text_tokens)
    record = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": meta["sha256"], "step": meta["step"],
        "lineage_id": state["lineage"]["id"], "base_checkpoint": tc.base_checkpoint,
        "base_rows_sha256": state["lineage"]["base_rows_sha256"], "dtype": "float16" if fp16 else "float32",
        "gpt_sha256": file_sha256(targets[0]), "tokenizer_sha256": file_sha256(targets[1]),
        "number_text_tokens": setup.cfg.number_text_tokens, "keys": len(weights),
    }
    atomic_write_json(targets[3], record)
    return Exported(out, targets[0], targets[1], targets[2], record)


def read_export_record(folder: str | Path) -> dict | None:
    path = Path(folder) / "export.json"
    return json.loads(path.read_text()) if path.is_file() else None
