"""Paired manifests (the community JSONL format), a fast .npy reader, the per-file dataset, the collate, a
resumable length-bucketed batch sampler with a token budget, and what training reads (Parquet or JSONL)."""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model.gpt import Batch

# field -> accepted JSON types; the emotion vector comes from prompt_emo_vec_path, else target_emo_vec_path
PAIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str, int), "target_text_ids_path": (str,), "target_codes_path": (str,),
    "prompt_condition_path": (str,), "target_text_len": (int,), "target_code_len": (int,),
}
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "speaker": (str, int), "language": (str,), "target_text": (str,), "prompt_id": (str, int),
    "target_id": (str, int), "target_duration": (int, float), "prompt_speaker": (str, int),
    "prompt_emo_vec_path": (str,), "target_emo_vec_path": (str,), "target_audio_path": (str,),
    "prompt_audio_path": (str,), "prompt_condition_len": (int,), "prompt_duration": (int, float),
}
EMO_FIELDS = ("prompt_emo_vec_path", "target_emo_vec_path")
UNPAIRED_FIELDS = ("text_ids_path", "codes_path", "condition_path")
FRAME_RATE = 50  # semantic codes per second (w2v-BERT 2.0 → MaskGCT RepCodec)


@dataclass(frozen=True)
class Pair:
    """One training pair: the prompt gives conditioning and emotion vector, the target text, ids and codes."""

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
    prompt_speaker: str = ""
    target_audio_path: Path | None = None
    prompt_audio_path: Path | None = None

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


def split_manifest_spec(spec: str | Path) -> tuple[Path, str | None]:
    """`path/to/train.jsonl::am` → (path, "am")."""
    path, _, lang = str(spec).partition("::")
    return Path(path), (lang or None)


def read_manifest_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line; FidelError on missing file, bad UTF-8 or bad JSON."""
    if not path.is_file():
        raise FidelError(path, "manifest is a folder, not a file" if path.is_dir() else "manifest not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise FidelError(path, f"line {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                               "re-save the manifest as UTF-8") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            truncated = exc.msg.startswith("Unterminated") or exc.pos >= len(line.rstrip()) - 1
            hint = " (truncated line: an interrupted write?)" if truncated else ""
            raise FidelError(path, f"line {number}: invalid JSON ({exc.msg} at column {exc.colno}){hint}") from None
        if not isinstance(record, dict):
            raise FidelError(path, f"line {number}: a record must be a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise FidelError(path, "manifest has no records")
    return records


def unpaired_hint(path: Path) -> str:
    return (f"unpaired manifest (one utterance per line: {', '.join(UNPAIRED_FIELDS)}); training needs prompt/target "
            f"pairs of the same speaker: run `fidel data pair --manifest {path} --out "
            f"{path.with_name(path.stem + '_pairs.jsonl')}`")


def type_name(types: tuple[type, ...]) -> str:
    return " or ".join({str: "string", int: "integer", float: "number"}[t] for t in types)


def check_record_types(record: dict, path: Path, number: int, fields: dict, required: bool) -> None:
    for key, types in fields.items():
        if key not in record:
            if required:
                raise FidelError(path, f"line {number}: missing field {key!r}")
            continue
        value = record[key]
        if value is None and not required:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise FidelError(path, f"line {number}: field {key!r} must be {type_name(types)}, got "
                                   f"{type(value).__name__} {json.dumps(value, ensure_ascii=False)[:40]}")
        if isinstance(value, str) and key.endswith("_path") and not value.strip():
            raise FidelError(path, f"line {number}: field {key!r} is empty")
        if isinstance(value, int) and key.endswith("_len") and value < 0:
            raise FidelError(path, f"line {number}: field {key!r} is negative ({value})")


def parse_pair(record: dict, path: Path, number: int, lang: str | None) -> Pair:
    if all(k in record for k in UNPAIRED_FIELDS) and "target_codes_path" not in record:
        raise FidelError(path, f"line {number}: {unpaired_hint(path)}")
    check_record_types(record, path, number, PAIRED_FIELDS, required=True)
    check_record_types(record, path, number, OPTIONAL_FIELDS, required=False)
    emo = next((record[k] for k in EMO_FIELDS if record.get(k)), None)
    if emo is None:
        raise FidelError(path, f"line {number}: missing field 'prompt_emo_vec_path' (or 'target_emo_vec_path')")
    folder = path.parent

    def resolve(key: str) -> Path | None:
        return folder / record[key] if record.get(key) else None

    return Pair(
        id=str(record["id"]),
        speaker=str(record.get("speaker") or ""),
        language=lang or str(record.get("language") or ""),
        text=record.get("target_text") or "",
        text_ids_path=folder / record["target_text_ids_path"],
        codes_path=folder / record["target_codes_path"],
        condition_path=folder / record["prompt_condition_path"],
        emo_vec_path=folder / emo,
        text_len=record["target_text_len"],
        code_len=record["target_code_len"],
        prompt_id=str(record.get("prompt_id") or ""),
        target_id=str(record.get("target_id") or ""),
        duration=record.get("target_duration"),
        manifest=path,
        line=number,
        prompt_speaker=str(record.get("prompt_speaker") or ""),
        target_audio_path=resolve("target_audio_path"),
        prompt_audio_path=resolve("prompt_audio_path"),
    )


def read_manifest(spec: str | Path) -> list[Pair]:
    """Read a paired JSONL manifest (`PATH` or `PATH::lang`); paths resolve relative to the manifest's folder."""
    path, lang = split_manifest_spec(spec)
    return [parse_pair(record, path, number, lang) for number, record in read_manifest_lines(path)]


def read_manifests(specs: Sequence[str | Path]) -> list[Pair]:
    return [pair for spec in specs for pair in read_manifest(spec)]


# ----------------------------------------------------------------------------- pairing unpaired manifests

def pick_prompts(by_speaker: dict[str, list[str]], pairs_per_target: int, seed: int
                 ) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(speaker, target id, prompt id): up to `pairs_per_target` prompts per target, drawn from the other
    utterances of its speaker; and the speakers that cannot form a pair (one utterance, or no speaker name)."""
    rng = random.Random(seed)
    pairs, skipped = [], []
    for speaker in sorted(by_speaker):
        ids = by_speaker[speaker]
        if len(ids) < 2 or not speaker:
            skipped.append(speaker or "(no speaker)")
            continue
        for target in ids:
            others = [p for p in ids if p != target]
            pairs += [(speaker, target, prompt) for prompt in rng.sample(others, min(pairs_per_target, len(others)))]
    return pairs, skipped


@dataclass
class PairingSummary:
    utterances: int
    pairs: int
    speakers: int
    skipped_speakers: list[str]
    out: str


def pair_manifest(src: str | Path, out: str | Path, pairs_per_target: int = 2, seed: int = 0) -> PairingSummary:
    """Pair an unpaired (one utterance per line) manifest into prompt/target pairs of the same speaker.

    Every target gets up to `pairs_per_target` prompts drawn from the other utterances of its speaker; speakers
    with a single utterance cannot form a pair and are listed. Paths are rewritten relative to `out`.
    """
    src, out = Path(src), Path(out)
    if out.exists():
        raise FidelError(out, "already exists; choose another --out (nothing is overwritten)")
    rows = read_manifest_lines(src)
    by_speaker: dict[str, list[dict]] = {}
    for number, record in rows:
        missing = [k for k in ("id", *UNPAIRED_FIELDS) if k not in record]
        if missing:
            raise FidelError(src, f"line {number}: missing field(s) {', '.join(missing)} of an unpaired manifest")
        by_speaker.setdefault(str(record.get("speaker") or ""), []).append(record)

    def rel(value: str | None) -> str | None:
        if not value:
            return value
        return Path(os.path.relpath((src.parent / value).resolve(), out.parent.resolve())).as_posix()

    def length(record: dict, key: str, path_key: str) -> int:
        if isinstance(record.get(key), int):
            return record[key]
        try:  # older manifests lack the lengths: the file knows (a missing file is the check's finding)
            return int(read_npy(src.parent / record[path_key]).size)
        except (OSError, ValueError):
            return 0

    records = {str(r["id"]): r for items in by_speaker.values() for r in items}
    picked, skipped = pick_prompts({s: [str(r["id"]) for r in items] for s, items in by_speaker.items()},
                                   pairs_per_target, seed)
    pairs = []
    for speaker, target_id, prompt_id in picked:
        target, prompt = records[target_id], records[prompt_id]
        pairs.append({
            "id": f"{target['id']}__{prompt['id']}", "speaker": speaker,
            "language": target.get("language", ""), "prompt_id": str(prompt["id"]),
            "prompt_speaker": speaker, "prompt_audio_path": rel(prompt.get("audio_path")),
            "prompt_condition_path": rel(prompt["condition_path"]),
            "prompt_condition_len": prompt.get("condition_len", 32),
            "prompt_emo_vec_path": rel(prompt.get("emo_vec_path")),
            "prompt_duration": prompt.get("duration"), "target_id": str(target["id"]),
            "target_audio_path": rel(target.get("audio_path")), "target_text": target.get("text", ""),
            "target_text_ids_path": rel(target["text_ids_path"]),
            "target_text_len": length(target, "text_len", "text_ids_path"),
            "target_codes_path": rel(target["codes_path"]),
            "target_code_len": length(target, "code_len", "codes_path"),
            "target_emo_vec_path": rel(target.get("emo_vec_path")),
            "target_duration": target.get("duration"),
        })
    if not pairs:
        raise FidelError(src, "no speaker has two utterances: nothing to pair")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps({k: v for k, v in p.items() if v is not None}, ensure_ascii=False) + "\n"
                           for p in pairs), encoding="utf-8")
    os.replace(tmp, out)
    return PairingSummary(len(rows), len(pairs), len(by_speaker) - len(skipped), skipped, str(out))


# ----------------------------------------------------------------------------- .npy files

NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[biuf]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), *\}")


def read_npy(path: str | Path) -> np.ndarray:
    """What np.load(path) returns for a plain numeric array written by np.save, read-only and ~4× faster.

    np.load parses the header with ast.literal_eval, which costs more than reading a small file; checks and
    builds read hundreds of thousands. Anything but the standard header goes through np.load itself.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] == NPY_MAGIC and len(data) > 10 and data[6] in (1, 2, 3):
        size = 2 if data[6] == 1 else 4
        start = 8 + size
        length = int.from_bytes(data[8:start], "little")
        match = NPY_HEADER.match(data[start:start + length].decode("latin1"))
        if match:
            dtype = np.dtype(match.group(1))
            shape = tuple(int(x) for x in match.group(2).split(",") if x.strip())
            count = math.prod(shape)
            offset = start + length
            if len(data) - offset == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    check_npy_size(data)
    return np.load(io.BytesIO(data), allow_pickle=False)


def check_npy_size(data: bytes) -> None:
    """ValueError when the header promises more data than the file holds: np.load would first allocate all of
    it (a corrupt header claiming 1 TiB is a MemoryError, not a bad file)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream)
    except (ValueError, SyntaxError, TypeError):
        return  # not a plain .npy: np.load says what it is
    want = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and want > len(data) - stream.tell():
        raise ValueError(f"header says shape {list(shape)} of {dtype} ({want:,} bytes) but the file holds "
                         f"{len(data) - stream.tell():,}: truncated or corrupt")


def load_npy(path: Path, pair: Pair) -> np.ndarray:
    try:
        return read_npy(path)
    except FileNotFoundError:
        raise FidelError(path, f"missing feature file (pair {pair.id}, {pair.where})") from None
    except (ValueError, OSError, EOFError) as exc:
        raise FidelError(path, f"not a readable .npy file (pair {pair.id}, {pair.where}): {str(exc)[:120]}") from None


@dataclass
class Example:
    text_ids: torch.Tensor
    codes: torch.Tensor
    condition: torch.Tensor
    emo_vec: torch.Tensor


def load_example(pair: Pair) -> Example:
    condition = load_npy(pair.condition_path, pair)
    return Example(
        text_ids=torch.from_numpy(load_npy(pair.text_ids_path, pair).astype(np.int64).reshape(-1)),
        codes=torch.from_numpy(load_npy(pair.codes_path, pair).astype(np.int64).reshape(-1)),
        condition=torch.from_numpy(condition.astype(np.float32).reshape(condition.shape[-2:])),
        emo_vec=torch.from_numpy(load_npy(pair.emo_vec_path, pair).astype(np.float32).reshape(-1)),
    )


class PairDataset(torch.utils.data.Dataset):
    """The community way: four .npy files per item, read at every step."""

    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        return load_example(self.pairs[index])

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([p.text_len for p in self.pairs], dtype=np.int64),
                np.array([p.code_len for p in self.pairs], dtype=np.int64))


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


# ----------------------------------------------------------------------------- the sampler

@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # batches of this epoch already handed out
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def padding_efficiency(batches: list[list[int]], text_lengths: Sequence[int], code_lengths: Sequence[int]) -> float:
    """Real tokens ÷ computed tokens: text and codes are padded separately to the batch's longest."""
    real = computed = 0
    for batch in batches:
        t = [text_lengths[i] for i in batch]
        c = [code_lengths[i] for i in batch]
        real += sum(t) + sum(c)
        computed += len(batch) * (max(t) + max(c))
    return real / max(1, computed)


def random_batches(n: int, batch_size: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """The community loader's batching (shuffle, fixed batch size): the baseline of padding efficiency."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of similar length, optionally under a token budget; the order comes from (seed, epoch) alone.

    Each epoch: shuffle all items, cut the order into windows of `window` items, sort each window by code
    length (scaled by a random factor in [1, 1 + jitter) so that batches regroup between epochs even when one
    window holds the whole dataset), and cut it into batches. Without `max_tokens` a batch is `batch_size`
    items, so steps per epoch are what the community loader gives. With `max_tokens` a batch grows while its
    size × (longest text + longest codes) stays within the budget, up to `max_batch` items (default 4 ×
    batch_size): short items make big batches, long ones small, and memory stays bounded. The batches are
    shuffled again so lengths don't march. Resume: `epoch_batches(epoch)[position:]` is all it takes.
    """

    def __init__(self, text_lengths: Sequence[int], code_lengths: Sequence[int], batch_size: int, seed: int = 0,
                 max_tokens: int | None = None, window: int | None = None, max_batch: int | None = None,
                 jitter: float = 0.05):
        if len(text_lengths) != len(code_lengths):
            raise ValueError("text_lengths and code_lengths differ in length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.text_lengths = np.asarray(text_lengths, dtype=np.int64)
        self.code_lengths = np.asarray(code_lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.window = int(window or batch_size * 64)
        self.max_batch = int(max_batch or (batch_size * 4 if max_tokens else batch_size))
        self.jitter = jitter
        self.state = SamplerState(seed=seed)

    def describe(self) -> dict:
        return {"kind": "bucket", "max_tokens": self.max_tokens, "window": self.window, "max_batch": self.max_batch,
                "jitter": self.jitter, "batch_size": self.batch_size, "items": len(self.text_lengths),
                "seed": self.state.seed}

    def pack(self, window: list[int], scale: list[float]) -> list[list[int]]:
        texts, codes = self.text_lengths, self.code_lengths
        window = sorted(window, key=lambda i: (codes[i] * scale[i], texts[i], i))
        if self.max_tokens is None:
            return [window[i:i + self.max_batch] for i in range(0, len(window), self.max_batch)]
        batches, batch, longest_text, longest_codes = [], [], 0, 0
        for i in window:
            t, c = max(longest_text, texts[i]), max(longest_codes, codes[i])
            if batch and ((len(batch) + 1) * (t + c) > self.max_tokens or len(batch) == self.max_batch):
                batches.append(batch)
                batch, t, c = [], texts[i], codes[i]
            batch.append(i)
            longest_text, longest_codes = t, c
        if batch:
            batches.append(batch)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.state.seed * 1_000_003 + epoch)
        order = list(range(len(self.text_lengths)))
        rng.shuffle(order)
        scale = [1.0 + self.jitter * rng.random() for _ in order]
        batches = []
        for start in range(0, len(order), self.window):
            batches += self.pack(order[start:start + self.window], scale)
        rng.shuffle(batches)
        return [[int(i) for i in b] for b in batches]

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


def sorted_batches(text_lengths: Sequence[int], code_lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Fixed, length-sorted batches (validation: deterministic and little padding)."""
    order = sorted(range(len(code_lengths)), key=lambda i: (code_lengths[i], text_lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
