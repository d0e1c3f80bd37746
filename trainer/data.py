"""Paired manifests (the community JSONL format), the dataset, the collate and a resumable bucketed sampler."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.errors import FidelError
from trainer.model import Batch

PAIRED_FIELDS = ("id", "target_text_ids_path", "target_codes_path", "prompt_condition_path", "target_text_len",
                 "target_code_len")
SINGLE_FIELDS = ("text_ids_path", "codes_path", "condition_path")


@dataclass(frozen=True)
class Pair:
    """One training pair: the prompt gives conditioning, the target gives text and codes."""

    id: str
    speaker: str
    language: str
    text: str
    text_ids_path: Path
    codes_path: Path
    condition_path: Path
    emo_vec_path: Path
    text_len: int
    code_len: int
    prompt_id: str
    target_id: str
    duration: float | None
    manifest: Path
    line: int


def split_manifest_spec(spec: str) -> tuple[Path, str | None]:
    """`path/to/train.jsonl::am` → (path, "am")."""
    path, _, lang = str(spec).partition("::")
    return Path(path), (lang or None)


def read_manifest(spec: str | Path) -> list[Pair]:
    """Read a paired JSONL manifest; paths resolve relative to the manifest's folder."""
    path, lang = split_manifest_spec(str(spec))
    if not path.is_file():
        raise FidelError(path, "manifest not found")
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise FidelError(path, f"not UTF-8 (byte {exc.start})") from exc
    for number, line in enumerate(lines, 1):
        if line.strip():
            pairs.append(parse_pair(json_record(line, path, number), path, number, lang))
    if not pairs:
        raise FidelError(path, "manifest has no records")
    return pairs


def json_record(line: str, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FidelError(path, f"line {number}: invalid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise FidelError(path, f"line {number}: a record must be a JSON object")
    return record


def parse_pair(record: dict, path: Path, number: int, lang: str | None) -> Pair:
    if all(k in record for k in SINGLE_FIELDS) and "target_codes_path" not in record:
        raise FidelError(path, f"line {number}: unpaired manifest (text_ids_path/codes_path); pair prompts with "
                               "targets of the same speaker first, e.g. `fidel data pair`, into target_*/prompt_* fields")
    missing = [k for k in PAIRED_FIELDS if k not in record]
    emo = record.get("prompt_emo_vec_path") or record.get("target_emo_vec_path")
    if not emo:
        missing.append("prompt_emo_vec_path")
    if missing:
        raise FidelError(path, f"line {number}: missing field(s) {', '.join(missing)}")
    for key in ("target_text_len", "target_code_len"):
        if not isinstance(record[key], int) or isinstance(record[key], bool):
            raise FidelError(path, f"line {number}: {key} must be an integer, got {record[key]!r}")
    folder = path.parent
    return Pair(
        id=str(record["id"]),
        speaker=str(record.get("speaker", "")),
        language=lang or str(record.get("language", "")),
        text=str(record.get("target_text", "")),
        text_ids_path=folder / record["target_text_ids_path"],
        codes_path=folder / record["target_codes_path"],
        condition_path=folder / record["prompt_condition_path"],
        emo_vec_path=folder / emo,
        text_len=record["target_text_len"],
        code_len=record["target_code_len"],
        prompt_id=str(record.get("prompt_id", "")),
        target_id=str(record.get("target_id", "")),
        duration=record.get("target_duration"),
        manifest=path,
        line=number,
    )


def read_manifests(specs: list[str | Path]) -> list[Pair]:
    return [pair for spec in specs for pair in read_manifest(spec)]


def load_npy(path: Path, pair: Pair) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise FidelError(path, f"missing feature file (pair {pair.id}, {pair.manifest.name} line {pair.line})") from exc
    except (ValueError, OSError, EOFError) as exc:
        raise FidelError(path, f"not a readable .npy file (pair {pair.id}): {str(exc)[:120]}") from exc


@dataclass
class Example:
    text_ids: torch.Tensor
    codes: torch.Tensor
    condition: torch.Tensor
    emo_vec: torch.Tensor


def load_example(pair: Pair) -> Example:
    return Example(
        text_ids=torch.from_numpy(load_npy(pair.text_ids_path, pair).astype(np.int64).reshape(-1)),
        codes=torch.from_numpy(load_npy(pair.codes_path, pair).astype(np.int64).reshape(-1)),
        condition=torch.from_numpy(load_npy(pair.condition_path, pair).astype(np.float32)),
        emo_vec=torch.from_numpy(load_npy(pair.emo_vec_path, pair).astype(np.float32).reshape(-1)),
    )


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        return load_example(self.pairs[index])


def pad_right(seqs: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=0)


def collate(examples: list[Example]) -> Batch:
    return Batch(
        text_ids=pad_right([e.text_ids for e in examples]),
        text_lengths=torch.tensor([len(e.text_ids) for e in examples]),
        codes=pad_right([e.codes for e in examples]),
        code_lengths=torch.tensor([len(e.codes) for e in examples]),
        condition=torch.stack([e.condition for e in examples]),
        emo_vec=torch.stack([e.emo_vec for e in examples]),
    )


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # batches of this epoch already handed out
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of similar length, shuffled per epoch from (seed, epoch); resumable mid-epoch.

    Sorting a shuffled window of `batch_size * bucket_factor` items by length keeps padding low while
    batches stay random; the order of batches is shuffled again so lengths don't march.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, bucket_factor: int = 50,
                 drop_last: bool = False):
        self.lengths = lengths
        self.batch_size = batch_size
        self.bucket_factor = bucket_factor
        self.drop_last = drop_last
        self.state = SamplerState(seed=seed)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.state.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        window = self.batch_size * self.bucket_factor
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        return len(self.epoch_batches(self.state.epoch))

    def __iter__(self):
        batches = self.epoch_batches(self.state.epoch)
        while self.state.position < len(batches):
            batch = batches[self.state.position]
            self.state.position += 1
            yield batch
        self.state.epoch += 1
        self.state.position = 0

    def load_state(self, state: dict) -> None:
        self.state = SamplerState(**state)
