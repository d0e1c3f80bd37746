"""A community-trainer run, reproduced on a small model, writing AmV2's checkpoint layout
(reference/amv2_checkpoint_format.md §2): one AdamW over `model.parameters()`, warmup + cosine LambdaLR, and
`{model, optimizer, scheduler, scaler, epoch, step, batch_idx, recent_checkpoints, accumulation_counter, extra,
last_losses}` saved with torch.save. Used by tests and the README's triage scenarios to make real "broken" and
"fixed" checkpoints to triage.

freeze: "none" (every text row trains: the broken run), "hooks" (the community gradient hooks: base rows still
move by weight decay), with weight_decay=0 the hooks keep the base rows intact (a "fixed" run).
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import load_gpt_config
from trainer.data import collate, training_data
from trainer.model import UnifiedVoiceGPT, load_upstream_state_dict, upstream_state_dict
from trainer.optim import lr_factor
from trainer.tokenizer import load_tokenizer
from trainer.vocab import extended_model
from trainer.weights import load_base_checkpoint

FREEZES = ("none", "hooks")


def community_model(base_checkpoint: str | Path, config: str | Path, tokenizer: str | Path, freeze: str,
                    seed: int = 0) -> UnifiedVoiceGPT:
    """One [N+1, D] text parameter as the community trainers have it (random new rows, their init)."""
    if freeze not in FREEZES:
        raise ValueError(f"freeze {freeze!r}: choose from {FREEZES}")
    cfg = load_gpt_config(config).with_text_tokens(load_tokenizer(tokenizer).get_piece_size())
    base = load_base_checkpoint(base_checkpoint, load_gpt_config(config))
    hooked, _ = extended_model(base, cfg, base.base_rows, "random", seed, None, "hooks")
    if freeze == "hooks":
        return hooked
    model = UnifiedVoiceGPT(cfg, base_rows=0, freeze="hooks")  # base_rows=0: the hook zeroes no row
    load_upstream_state_dict(model, upstream_state_dict(hooked))
    return model


def community_run(base_checkpoint: str | Path, config: str | Path, tokenizer: str | Path, train_manifest: str | Path,
                  out_dir: str | Path, steps: int, save_at: tuple[int, ...] = (), freeze: str = "none",
                  learning_rate: float = 3e-3, weight_decay: float = 0.01, warmup_steps: int = 2,
                  total_steps: int | None = None, batch_size: int = 8, seed: int = 0) -> list[Path]:
    """Train `steps` AdamW steps the community way and save `model_step{N}.pth` at each step in save_at (and the
    last). Returns the written paths."""
    torch.manual_seed(seed)
    model = community_model(base_checkpoint, config, tokenizer, freeze, seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    total = total_steps or steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total, 0.0))
    data = training_data([train_manifest], [train_manifest], batch_size, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, step, epoch, losses = [], 0, 0, {}
    while step < steps:
        for ids in data.sampler.epoch_batches(epoch):
            sums = model.loss_sums(collate([data.train_set[i] for i in ids]))
            text, mel = sums.losses()
            (0.2 * text + 0.8 * mel).backward()
            text, mel = text.detach(), mel.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            losses = {"text_loss": text.item(), "mel_loss": mel.item()}
            if step in save_at or step == steps:
                path = out / f"model_step{step}.pth"
                torch.save({"model": upstream_state_dict(model), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": None, "epoch": epoch, "step": step,
                            "batch_idx": 0, "recent_checkpoints": [str(p) for p in written[-2:]],
                            "accumulation_counter": 0,
                            "extra": {"type": "step", "tokenizer": str(tokenizer), "amp_dtype": "float32"},
                            "last_losses": losses}, path)
                written.append(path)
            if step >= steps:
                break
        epoch += 1
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m trainer.community_run", description=__doc__.splitlines()[0])
    p.add_argument("--base-checkpoint", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--train-manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-at", type=int, nargs="*", default=[])
    p.add_argument("--freeze", choices=FREEZES, default="none")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    for path in community_run(a.base_checkpoint, a.config, a.tokenizer, a.train_manifest, a.out, a.steps,
                              tuple(a.save_at), a.freeze, a.learning_rate, a.weight_decay, batch_size=a.batch_size):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
