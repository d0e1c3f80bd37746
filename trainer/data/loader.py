"""What training reads: one loader for both formats, Parquet datasets (fidel data build) and paired JSONL
manifests, with the bucketed train sampler and fixed validation batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fidel_tts.trainer.data.manifest import (
    BucketBatchSampler,
    PairDataset,
    read_manifests,
    sorted_batches,
    split_manifest_spec,
)
from fidel_tts.trainer.data.parquet import ParquetPairs
from fidel_tts.trainer.errors import FidelError


@dataclass
class TrainingData:
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    sampler: BucketBatchSampler
    val_batches: list[list[int]]
    source: str  # "parquet" or "jsonl"
    info: dict = field(default_factory=dict)


def is_parquet(spec: str | Path) -> bool:
    return split_manifest_spec(spec)[0].suffix == ".parquet"


def open_split(specs: Sequence[str | Path], tokenizer: str | Path | None):
    """A dataset over Parquet files (fidel data build) or paired JSONL manifests; never a mix."""
    kinds = {is_parquet(s) for s in specs}
    if not specs:
        raise FidelError(None, "no training data given")
    if len(kinds) > 1:
        raise FidelError(str(specs[0]), "mixes Parquet datasets and JSONL manifests; give one kind")
    if kinds == {True}:
        return ParquetPairs([split_manifest_spec(s)[0] for s in specs], tokenizer=tokenizer), "parquet"
    return PairDataset(read_manifests(specs)), "jsonl"


def training_data(train_specs: Sequence[str | Path], val_specs: Sequence[str | Path], batch_size: int, seed: int,
                  tokenizer: str | Path | None = None, max_tokens: int | None = None) -> TrainingData:
    """Train and val datasets, the bucketed train sampler and fixed val batches.

    A Parquet dataset must have been built with `tokenizer` (its sha256 is compared); JSONL manifests are read
    as the community trainers read them, stored text ids included.
    """
    train_set, source = open_split(train_specs, tokenizer)
    val_set, _ = open_split(val_specs, tokenizer)
    sampler = BucketBatchSampler(*train_set.lengths(), batch_size, seed=seed, max_tokens=max_tokens)
    val_batches = sorted_batches(*val_set.lengths(), batch_size)
    return TrainingData(train_set, val_set, sampler, val_batches, source, {"sampler": sampler.describe()})
