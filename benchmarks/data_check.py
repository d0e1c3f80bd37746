"""Time `fidel data check` and `fidel data build` on a synthetic 100k-pair manifest with real feature files,
then compare the Parquet loader with the community per-file .npy loader, side by side in one run.

The corpus: `--pairs / 2` utterances of 250 speakers, random Amharic sentences tokenised with a small extended
tokenizer, 50 Hz codes of 1.8-8.5 s clips (codebook 8192), conditioning [32, --dim] float32 and emotion vector
[--dim] float32 as .npy files, every utterance the target of two pairs with prompts of its speaker (the AmV2
pairing). Conditioning is random, so only its size matters: --dim 64 keeps the files near 1 GB; the real model
is 1280 (20× the conditioning bytes). Everything lives in a temporary folder that is deleted at the end.

Run: .venv/bin/python -m benchmarks.data_check [--pairs 100000] [--dim 64] [--workdir /tmp]
Goals: check + build within 120 s on 2 cores; the Parquet loader at least 5× the .npy loader.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fidel_tts.trainer.data.manifest import BucketBatchSampler, Example, PairDataset, collate, read_manifest
from fidel_tts.trainer.data.parquet import ParquetPairs
from fidel_tts.trainer.model.config import write_config_yaml
from fidel_tts.trainer.text.tokenizer import encode, load_tokenizer

from tests.fixtures.synthetic import AMHARIC_WORDS, make_tiny_project, tiny_config_dict

ROOT = Path(__file__).resolve().parents[1]

SPEAKERS = 250
CODEBOOK = 8192


def write_corpus(root: Path, pairs: int, dim: int, seed: int = 0) -> tuple[Path, Path, Path, Path]:
    """Tokenizer, config, features and train/val paired manifests under root."""
    project = make_tiny_project(root / "project", n_train=4, n_val=2)
    sp = load_tokenizer(project.tokenizer)
    raw = tiny_config_dict(sp.get_piece_size(), dim=dim, codebook=CODEBOOK)
    raw["gpt"].update(max_text_tokens=600, max_mel_tokens=1815)
    config = write_config_yaml(raw, root / "config.yaml")
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    utterances = pairs // 2
    feats = root / "features"
    for sub in ("text_ids", "codes", "condition", "emo_vec"):
        (feats / sub).mkdir(parents=True, exist_ok=True)
    by_speaker: dict[str, list[dict]] = {}
    started = time.monotonic()
    for u in range(utterances):
        speaker = f"spk{u % SPEAKERS:03d}"
        words = rng.randint(3, 15)
        text = " ".join(rng.choice(AMHARIC_WORDS) for _ in range(words)) + "።"
        duration = round(words * 0.5 + rng.uniform(0.3, 1.0), 3)
        uid = f"utt{u:06d}"
        ids = np.asarray(encode(sp, text), dtype=np.int32)
        codes = nprng.integers(0, CODEBOOK, int(round(duration * 50)), dtype=np.int32)
        np.save(feats / "text_ids" / f"{uid}.npy", ids)
        np.save(feats / "codes" / f"{uid}.npy", codes)
        np.save(feats / "condition" / f"{uid}.npy", nprng.standard_normal((32, dim), dtype=np.float32))
        np.save(feats / "emo_vec" / f"{uid}.npy", nprng.standard_normal(dim, dtype=np.float32))
        by_speaker.setdefault(speaker, []).append({"id": uid, "text": text, "duration": duration,
                                                    "text_len": len(ids), "code_len": len(codes)})
    print(f"  features of {utterances} utterances written in {time.monotonic() - started:.0f} s", flush=True)
    rows = {"train": [], "val": []}
    for speaker, utts in sorted(by_speaker.items()):
        n_val = max(3, len(utts) // 50)
        for split, side in (("val", utts[:n_val]), ("train", utts[n_val:])):
            for target in side:
                others = [p for p in side if p["id"] != target["id"]]
                for prompt in rng.sample(others, min(2, len(others))):
                    rows[split].append({
                        "id": f"{target['id']}__{prompt['id']}", "speaker": speaker, "language": "am",
                        "prompt_id": prompt["id"], "prompt_condition_path": f"features/condition/{prompt['id']}.npy",
                        "prompt_condition_len": 32, "prompt_emo_vec_path": f"features/emo_vec/{prompt['id']}.npy",
                        "target_id": target["id"], "target_text": target["text"],
                        "target_text_ids_path": f"features/text_ids/{target['id']}.npy",
                        "target_text_len": target["text_len"],
                        "target_codes_path": f"features/codes/{target['id']}.npy",
                        "target_code_len": target["code_len"], "target_duration": target["duration"]})
    manifests = []
    for split in ("train", "val"):
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split]), encoding="utf-8")
        manifests.append(path)
    return project.tokenizer, config, manifests[0], manifests[1]


def fidel(*args: str) -> float:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fidel_tts.flows.cli", "data", *args], cwd=ROOT, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    tail = "\n".join(proc.stdout.strip().splitlines()[-4:])
    print("  " + tail.replace("\n", "\n  "), flush=True)
    if proc.returncode != 0:
        sys.exit(f"fidel data {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return elapsed


class CommunityNpyPairs:
    """The community trainers' dataset: np.load of four .npy files per item (train_gpt_v2.py)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        import torch

        p = self.pairs[index]
        return Example(torch.from_numpy(np.load(p.text_ids_path).astype(np.int64)),
                       torch.from_numpy(np.load(p.codes_path).astype(np.int64)),
                       torch.from_numpy(np.load(p.condition_path).astype(np.float32)),
                       torch.from_numpy(np.load(p.emo_vec_path).astype(np.float32)))


def time_loader(dataset, batches: list[list[int]]) -> float:
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=0)
    started = time.monotonic()
    items = 0
    for batch in loader:
        items += batch.size
    return items / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64, help="model_dim: conditioning [32, dim], emotion [dim]")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary corpus goes")
    parser.add_argument("--loader-items", type=int, default=20_000, help="training items each loader serves")
    parser.add_argument("--keep", action="store_true", help="keep the corpus (prints where)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fidel-data-bench-", dir=args.workdir))
    try:
        print(f"corpus: {args.pairs} pairs, conditioning [32, {args.dim}] float32, in {root}", flush=True)
        tokenizer, config, train, val = write_corpus(root, args.pairs, args.dim)
        n_pairs = sum(1 for _ in open(train, encoding="utf-8")) + sum(1 for _ in open(val, encoding="utf-8"))
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print(f"  {n_pairs} pairs, {disk / 2**20:.0f} MiB on disk ({os.cpu_count()} CPU cores)", flush=True)
        common = ["--train", f"{train}::am", "--val", f"{val}::am", "--tokenizer", str(tokenizer),
                  "--config", str(config), "--show", "0"]
        print("fidel data check:", flush=True)
        t_check = fidel("check", *common, "--out", str(root / "check"))
        print("fidel data build:", flush=True)
        t_build = fidel("build", *common, "--out", str(root / "dataset"))
        total = t_check + t_build
        print(f"\ncheck {t_check:.1f} s ({n_pairs / t_check:,.0f} pairs/s), build {t_build:.1f} s "
              f"({n_pairs / t_build:,.0f} pairs/s); check + build {total:.1f} s "
              f"({'within' if total <= 120 else 'OVER'} the 120 s goal), command start-up included")

        parquet = root / "dataset" / "train.parquet"
        started = time.monotonic()
        fast = ParquetPairs([parquet], tokenizer=tokenizer)
        fast.open()
        t_open = time.monotonic() - started
        pairs = read_manifest(train)
        sampler = BucketBatchSampler(*fast.lengths(), batch_size=16, seed=0)
        batches, served = [], 0
        for batch in sampler.epoch_batches(0):
            batches.append(batch)
            served += len(batch)
            if served >= args.loader_items:
                break
        community_rate = time_loader(CommunityNpyPairs(pairs), batches)
        npy_rate = time_loader(PairDataset(pairs), batches)
        parquet_rate = time_loader(fast, batches)
        print(f"\nloader over the same {len(batches)} bucketed batches ({served} items) into padded batches, one "
              "process, warm page cache:")
        print(f"  per-file .npy, np.load (community):    {community_rate:9,.0f} items/s")
        print(f"  per-file .npy, fidel's header parser:  {npy_rate:9,.0f} items/s")
        print(f"  Parquet, memory-mapped (fidel):        {parquet_rate:9,.0f} items/s (first open decodes it to "
              f".arrow once: {t_open:.1f} s)")
        ratio = parquet_rate / community_rate
        print(f"  ratio Parquet / community .npy: {ratio:.1f}× ({'meets' if ratio >= 5 else 'BELOW'} the 5× goal); "
              f"Parquet / fidel .npy: {parquet_rate / npy_rate:.1f}×")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
