"""Throughput of `fidel prepare`'s feature path on clips of mixed length: clips per second one at a time, in
batches padded to their longest clip (before length buckets), and in length buckets (now), side by side; and the
w2v-BERT time saved by stopping at hidden state 17 instead of running all 24 layers.

The w2v-BERT stand-in has the real model's shape (width 1024, 16 heads, feed-forward 4096; random weights, so the
arithmetic is the real one's), the codec and UnifiedVoice conformers are the small stand-ins of
trainer/data/features.py write_tiny_models. Each clip is run as inference reads a prompt file: its speaker wave
(codes, conditioning) and its emotion wave both go through w2v-BERT. The clips are a speech-like signal of
--min-seconds..--max-seconds, lengths drawn at random (seeded), in a random order as a manifest would have them;
run_shard sorts a shard by length before cutting it into batches, and so does this.

Run: .venv/bin/python -m benchmarks.prepare_throughput [--clips 16] [--batch-size 8] [--threads 2] [--layers 24]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from fidel_tts.trainer.data import features
from fidel_tts.trainer.data.features import (
    FEATURE_DIM,
    HIDDEN_LAYER,
    SAMPLE_RATE,
    ClipAudio,
    FeatureModels,
    clip_features,
    up_to_layer,
    write_tiny_models,
)


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def speech_like(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 1.3 * t)) / SAMPLE_RATE
    return (sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.2 + rng.normal(0, 0.01, len(t))).astype(np.float32)


def real_width_w2v(layers: int):
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    torch.manual_seed(0)
    config = Wav2Vec2BertConfig(hidden_size=FEATURE_DIM, num_hidden_layers=layers, num_attention_heads=16,
                                intermediate_size=4096)
    return Wav2Vec2BertModel(config).eval()


def sorted_batches(clips: list[ClipAudio], size: int) -> list[list[ClipAudio]]:
    ordered = sorted(clips, key=lambda c: len(c.speaker))  # as run_shard orders a shard
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--layers", type=int, default=24, help="w2v-BERT 2.0's layer count, for the layer-17 saving")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        models = FeatureModels.load(write_tiny_models(Path(tmp), model_dim=128, codebook=256), torch.device("cpu"))
    full = real_width_w2v(args.layers)
    models.w2v = up_to_layer(real_width_w2v(args.layers), HIDDEN_LAYER).to(args.device)
    models.device = torch.device(args.device)
    for name in ("mean", "std", "codec", "gpt"):
        setattr(models, name, getattr(models, name).to(args.device))
    rng = np.random.default_rng(0)
    seconds = rng.uniform(args.min_seconds, args.max_seconds, args.clips)
    waves = [speech_like(s, i) for i, s in enumerate(seconds)]
    clips = [ClipAudio(w, w, w * 0.95) for w in waves]  # two waves each, as a file read at 22.05 and 16 kHz gives
    batches = sorted_batches(clips, args.batch_size)
    print(f"{len(clips)} clips of {seconds.min():.1f}-{seconds.max():.1f} s (total {seconds.sum():.0f} s, 2 w2v-BERT "
          f"waves each), batch size {args.batch_size}, {args.threads} CPU thread(s), device {args.device}, w2v-BERT "
          f"width {FEATURE_DIM}, {HIDDEN_LAYER} of {args.layers} layers run")
    clip_features(models, clips[:1])  # warm-up

    one_s = timed(lambda: [clip_features(models, [c]) for c in clips])
    with mock.patch.object(features, "BUCKET_SPREAD", float("inf")):  # one batch padded to its longest clip
        padded_s = timed(lambda: [clip_features(models, b) for b in batches])
    bucketed_s = timed(lambda: [clip_features(models, b) for b in batches])
    print(f"{'':34}{'clips/s':>8}{'seconds':>9}{'÷ one at a time':>17}")
    for name, took in (("one at a time", one_s), ("batched, padded to the longest", padded_s),
                       ("batched, length buckets", bucketed_s)):
        print(f"{name:34}{len(clips) / took:8.2f}{took:9.1f}{one_s / took:16.2f}×")
    layer_saving(full.to(args.device), models, clips)


@torch.inference_mode()
def layer_saving(full, models: FeatureModels, clips: list[ClipAudio]) -> None:
    """w2v-BERT alone, one wave at a time: all layers against stopping after layer 17."""
    inputs = [models.extractor(c.speaker, sampling_rate=SAMPLE_RATE, return_tensors="pt").to(models.device)
              for c in clips]

    def run(model):
        for x in inputs:
            model(input_features=x["input_features"], attention_mask=x["attention_mask"], output_hidden_states=True)

    all_s, cut_s = timed(lambda: run(full)), timed(lambda: run(models.w2v))
    print(f"w2v-BERT on the {len(clips)} speaker waves: {len(full.encoder.layers)} layers {all_s:.1f} s, "
          f"{len(models.w2v.encoder.layers)} layers {cut_s:.1f} s: {1 - cut_s / all_s:.0%} saved")


if __name__ == "__main__":
    main()
