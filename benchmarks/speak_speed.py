"""Time per second of audio of `fidel speak`'s path (IndexTTS2.infer: GPT, s2mel with 25 diffusion steps, BigVGAN)
on CPU with the random-weight stand-ins of tests/unit/test_speak.py. Random weights stop at a random code, at
most --max-mel-tokens, so each seed gives another length. The s2mel, GPT (one layer of width 1280) and BigVGAN
stand-ins are small, w2v-BERT has its real width and 17 layers: this measures the pipeline at toy size, not the
real model's speed.

Run: .venv/bin/python -m benchmarks.speak_speed [--texts 3] [--max-mel-tokens 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from fidel_tts.trainer.evaluation.speak import load_tts, seed_everything

from tests.unit.test_speak import voice, write_standins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=3)
    parser.add_argument("--max-mel-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        release, cache = write_standins(Path(tmp))
        from huggingface_hub import constants

        constants.HF_HUB_CACHE = str(cache)
        started = time.perf_counter()
        tts = load_tts(release, "cpu")
        print(f"IndexTTS2 built from the stand-ins in {time.perf_counter() - started:.1f} s")
        prompt = voice(Path(tmp) / "voice.wav")
        for number in range(args.texts):
            seed_everything(number)
            started = time.perf_counter()
            rate, samples = tts.infer(str(prompt), "hello world.", None, max_mel_tokens=args.max_mel_tokens)
            seconds, audio = time.perf_counter() - started, len(samples) / rate
            print(f"text {number + 1}: {audio:.2f} s of audio in {seconds:.2f} s: {seconds / audio:.2f} s per second")


if __name__ == "__main__":
    main()
