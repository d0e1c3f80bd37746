"""Padding efficiency (real tokens ÷ computed tokens) of fidel's bucketed sampler against random batching, on the
demo data (`fidel demo`'s espeak-ng corpus: Amharic fine-tune pairs and the English base pairs).

Real tokens of a batch: the sum of every item's text ids and codes. Computed tokens: batch size × (longest text
+ longest codes), since text and codes are padded separately (the 34-slot prefix and start/stop tokens are
left out of both, which only makes the ratio stricter). Random batching is the community loader's (shuffle,
fixed batch size); the bucketed sampler is trainer.data.manifest.BucketBatchSampler as training uses it (batch-size items
from length-sorted windows) and with a token budget of batch size × the mean item length (batches filled to the
budget). Each number is the mean over 5 epochs; "b." is batches per epoch.

Run: .venv/bin/python -m benchmarks.padding_efficiency [--root demo]
The demo corpus, tokenizers and manifests are built under --root when missing (as `fidel demo` does, a few
minutes with espeak-ng). Goal: ≥ 0.9 for the bucketed sampler.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from fidel_tts.trainer.data.manifest import (
    BucketBatchSampler,
    padding_efficiency,
    random_batches,
    read_manifest,
)

EPOCHS = 5


def demo_manifests(root: Path) -> dict[str, Path]:
    manifests = {name: root / "manifests" / f"{name}.jsonl" for name in ("am_train", "en_train")}
    if all(p.is_file() for p in manifests.values()):
        return manifests
    from fidel_tts.flows.demo.flow import FULL, corpus_step, manifest_step, tokenizer_step

    print(f"building the demo corpus under {root} (espeak-ng, a few minutes) …", flush=True)
    corpus = corpus_step.fn(root.resolve(), FULL)
    base_tok, am_tok = tokenizer_step.fn(root.resolve(), corpus, FULL)
    manifest_step.fn(root.resolve(), corpus, base_tok, am_tok)
    return manifests


def mean_efficiency(make_batches, texts: list[int], codes: list[int]) -> tuple[float, float]:
    runs = [make_batches(epoch) for epoch in range(EPOCHS)]
    efficiency = statistics.mean(padding_efficiency(b, texts, codes) for b in runs)
    return efficiency, statistics.mean(len(b) for b in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("demo"), help="the demo root (`fidel demo --root`)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    for path in demo_manifests(args.root).values():
        pairs = read_manifest(path)
        texts, codes = [p.text_len for p in pairs], [p.code_len for p in pairs]
        print(f"\n{path} ({len(pairs)} pairs; text ids {min(texts)}-{max(texts)}, codes {min(codes)}-{max(codes)})")
        print(f"{'batch size':>10} | {'random':>16} | {'bucketed':>16} | {'token budget':>16} | bucketed ÷ random")
        n, mean = len(pairs), statistics.mean(t + c for t, c in zip(texts, codes, strict=True))
        for batch_size in args.batch_sizes:
            rows = [mean_efficiency(lambda e, b=batch_size: random_batches(n, b, args.seed, e), texts, codes)]  # noqa: B023
            for budget in (None, int(batch_size * mean)):
                sampler = BucketBatchSampler(texts, codes, batch_size, seed=args.seed, max_tokens=budget)
                rows.append(mean_efficiency(sampler.epoch_batches, texts, codes))
            cells = " | ".join(f"{eff:.3f} ({count:4.0f} b.)" for eff, count in rows)
            verdict = "" if min(r[0] for r in rows[1:]) >= 0.9 else "  BELOW the 0.9 goal"
            print(f"{batch_size:>10} | {cells} | {rows[1][0] / rows[0][0]:.2f}×{verdict}")


if __name__ == "__main__":
    main()
