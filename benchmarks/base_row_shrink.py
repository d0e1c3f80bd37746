"""What the weight-decay shrink of a fixed community run does to the loss: base rows as the run left them vs
restored to the base (what fidel does when it imports such a run).

A community run with the hooks and AdamW's default weight decay (tests/fixtures/community_run.py: the AmV2 step, lr 2e-5,
wd 0.01, cosine with 1000 warmup steps) is made on the tiny generated project at the guide's step counts. For each,
the validation text and mel losses are computed twice on the same weights: once with base rows 0..B-1 of
text_embedding / text_head as saved, once with them restored from the base.

Run: .venv/bin/python -m benchmarks.base_row_shrink [--steps 25000 52000] [--root /tmp/shrink]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from fidel_tts.trainer.data.loader import training_data
from fidel_tts.trainer.model.config import load_gpt_config
from fidel_tts.trainer.model.gpt import SPLIT_KEYS, UnifiedVoiceGPT, load_upstream_state_dict
from fidel_tts.trainer.model.weights import read_state_dict, torch_load
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.text.tokenizer import load_tokenizer
from fidel_tts.trainer.training.metrics import evaluate

from tests.fixtures.community_run import Project, community_run
from tests.fixtures.synthetic import make_tiny_project


def val_losses(project, state: dict) -> tuple[float, float]:
    cfg = load_gpt_config(project.base_config).with_text_tokens(load_tokenizer(project.tokenizer).get_piece_size())
    model = UnifiedVoiceGPT(cfg, base_rows=0, freeze="hooks")
    load_upstream_state_dict(model, state)
    data = training_data([project.val_manifest], [project.val_manifest], 8, 0)
    losses = evaluate(model, data.val_set, data.val_batches, torch.device("cpu"), None, Dist())
    return losses["val_text_loss"], losses["val_mel_loss"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[25000, 52000])
    p.add_argument("--root", default=None)
    a = p.parse_args()
    root = Path(a.root or tempfile.mkdtemp(prefix="shrink-"))
    tiny = make_tiny_project(root / "project")
    project = Project(tiny.base_checkpoint, tiny.base_config, tiny.tokenizer, tiny.train_manifest)
    base = read_state_dict(tiny.base_checkpoint)
    b = base["text_embedding.weight"].shape[0] - 1
    print("| steps | base rows | median value/base | val text loss | val mel loss |\n|---|---|---|---|---|")
    for steps in a.steps:
        saved = torch_load(community_run(project, root / f"run{steps}", steps)[-1])["model"]
        restored = dict(saved)
        for key in SPLIT_KEYS:
            restored[key] = torch.cat([base[key][:b], saved[key][b:]])
        ratio = (saved["text_embedding.weight"][:b] / base["text_embedding.weight"][:b]).median()
        for label, state in (("as the run left them", saved), ("restored to the base", restored)):
            text, mel = val_losses(tiny, state)
            shown = f"{float(ratio):.5f}" if state is saved else "1"
            print(f"| {steps} | {label} | {shown} | {text:.5f} | {mel:.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
