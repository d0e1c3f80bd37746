"""Throughput of `fidel prepare`'s feature path: clips per second in length-sorted batches against one clip at a
time, in one run, on espeak-ng audio of the demo corpus (flows/demo/corpus.py) with the random-weight stand-ins
of the three models (trainer/data/features.py write_tiny_models: w2v-BERT 2.0's 17 layers at width 1024 with small
feed-forwards, a one-layer RepCodec, a small UnifiedVoice's conformers and perceivers).

Both passes run trainer.data.features.clip_features; batched and one-at-a-time give the same codes (tested), so the
ratio is pure speed. It also counts how many clips the community's batched preprocessing would have stored with
padded codes (every clip of a batch saved at the batch's longest length).

Run: .venv/bin/python -m benchmarks.prepare_throughput [--clips 24] [--batch-size 8] [--threads 2]
On the real models and a GPU the batched w2v-BERT pass dominates and the ratio is larger; these tiny models on
CPU show the mechanism, not that number.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from fidel_tts.flows.demo.corpus import SPEAKERS, build_utterances
from fidel_tts.trainer.data.features import FeatureModels, clip_features, read_audio, write_tiny_models
from fidel_tts.trainer.data.prepare import PrepareSettings


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24, help="espeak-ng clips (spread over 6 speakers)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        per_speaker = -(-args.clips // len(SPEAKERS))
        utterances = build_utterances(root / "corpus", "am", per_speaker, progress=False)[:args.clips]
        limits = PrepareSettings("", "", "", max_seconds=60).limits
        waves = [read_audio(u.wav_path, limits)[0] for u in utterances]
        models = FeatureModels.load(write_tiny_models(root / "models", model_dim=128, codebook=256),
                                    torch.device(args.device))
    seconds = [len(w) / 16000 for w in waves]
    print(f"{len(waves)} espeak-ng clips, {min(seconds):.1f}-{max(seconds):.1f} s (total {sum(seconds):.0f} s), "
          f"batch size {args.batch_size}, {args.threads} CPU thread(s), device {args.device}")
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    clip_features(models, waves[:2])  # warm-up

    one_s = timed(lambda: [clip_features(models, [w]) for w in waves])
    batched_s = timed(lambda: [clip_features(models, [waves[i] for i in b]) for b in batches])
    print(f"one at a time: {len(waves) / one_s:6.2f} clips/s ({one_s:.1f} s)")
    print(f"batched:       {len(waves) / batched_s:6.2f} clips/s ({batched_s:.1f} s)")
    print(f"batched ÷ one at a time: {one_s / batched_s:.2f}×")

    frames = [len(c.codes) for b in batches for c in clip_features(models, [waves[i] for i in b])]
    padded = sum(1 for b in batches for i in b if len(waves[i]) < max(len(waves[j]) for j in b))
    worst = max(max(len(waves[j]) for j in b) / 320 - len(waves[i]) / 320 for b in batches for i in b)
    print(f"codes per clip: {min(frames)}-{max(frames)} (duration × 50, each at its own length); the community's "
          f"batched preprocessing would have stored {padded} of {len(waves)} clips with padded codes (up to "
          f"{worst:.0f} extra codes)")


if __name__ == "__main__":
    main()
