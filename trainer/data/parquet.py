"""The checked data as a Parquet dataset, one row per pair, and a memory-mapped reader for training.

`build_dataset` runs every check (trainer.data.checks) and streams each usable row into `<split>.parquet`:
text ids re-tokenised from the text with the verified tokenizer (int32), codes int16, conditioning and
emotion vector float16 or float32 (recorded), row groups of about 32 MiB for streaming, and a content hash
over the rows for lineage (dataset.json and the Parquet footer both hold it).

`ParquetPairs` reads it for training. Parquet pages must be decoded, so on first use each file is decoded
once into an uncompressed Arrow IPC file beside it (`<split>.arrow`, tied to the content hash) that is then
memory-mapped: items are zero-copy slices, shared by DataLoader workers through the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fidel_tts.trainer.data.checks import (
    CheckContext,
    CheckSettings,
    DataReport,
    RowArrays,
    RowSink,
    run_checks,
)
from fidel_tts.trainer.data.manifest import Example, Pair, split_manifest_spec
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.config import GPTConfig

FORMAT = "fidel-pairs/1"
ROW_GROUP_BYTES = 32 << 20
FLOAT_TYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
TENSOR_COLUMNS = ("text_ids", "codes", "condition", "emo_vec")
DATASET_JSON = "dataset.json"


def codes_dtype(codebook: int) -> np.dtype:
    """int16 holds every IndexTTS2 code (8192 + start/stop); a larger codebook needs int32."""
    return np.dtype(np.int16) if codebook + 2 <= np.iinfo(np.int16).max else np.dtype(np.int32)


def dataset_schema(cfg: GPTConfig, cond_dtype: str, codes: np.dtype) -> pa.Schema:
    float_type = FLOAT_TYPES[cond_dtype][1]
    return pa.schema([
        ("pair_id", pa.string()), ("speaker", pa.string()), ("language", pa.string()), ("text", pa.string()),
        ("text_ids", pa.list_(pa.int32())), ("codes", pa.list_(pa.from_numpy_dtype(codes))),
        ("condition", pa.list_(float_type, cfg.condition_num_latent * cfg.model_dim)),
        ("emo_vec", pa.list_(float_type, cfg.model_dim)), ("text_len", pa.int32()), ("code_len", pa.int32()),
        ("duration", pa.float32()), ("prompt_id", pa.string()), ("target_id", pa.string()), ("source", pa.string()),
        ("row_sha256", pa.binary(32)),
    ])


def rows_per_group(cfg: GPTConfig, cond_dtype: str) -> int:
    itemsize = np.dtype(FLOAT_TYPES[cond_dtype][0]).itemsize
    row_bytes = (cfg.condition_num_latent + 1) * cfg.model_dim * itemsize + 2 * 400 + 4 * 60 + 200
    return int(np.clip(ROW_GROUP_BYTES // row_bytes, 128, 65536))


def list_array(arrays: list[np.ndarray], dtype: np.dtype, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=type_)


def fixed_array(arrays: list[np.ndarray], type_: pa.FixedSizeListType) -> pa.Array:
    flat = np.stack(arrays).reshape(-1) if arrays else np.zeros(0, type_.value_type.to_pandas_dtype())
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), type_.list_size)


class SplitWriter:
    """Streams one split's rows into a Parquet file, one row group per `group_rows` rows."""

    def __init__(self, path: Path, schema: pa.Schema, group_rows: int, float_dtype: np.dtype, code_dtype: np.dtype):
        self.path = path
        self.schema = schema
        self.group_rows = group_rows
        self.float_dtype = float_dtype
        self.code_dtype = code_dtype
        self.writer = pq.ParquetWriter(path, schema, compression="zstd", compression_level=1,
                                       use_dictionary=["speaker", "language"], write_statistics=["text_len", "code_len"])
        self.buffer: list[tuple[Pair, RowArrays]] = []
        self.indices: list[int] = []  # the split's row index of every row written, in order
        self.row_hashes: list[bytes] = []

    def add(self, index: int, pair: Pair, arrays: RowArrays) -> None:
        stored = RowArrays(arrays.text_ids.astype(np.int32, copy=False), arrays.codes.astype(self.code_dtype),
                           arrays.condition.astype(self.float_dtype), arrays.emo_vec.astype(self.float_dtype))
        digest = hashlib.sha256(pair.id.encode("utf-8") + b"\0")
        for array in (stored.text_ids, stored.codes, stored.condition, stored.emo_vec):
            digest.update(np.ascontiguousarray(array).tobytes())
        self.indices.append(index)
        self.row_hashes.append(digest.digest())
        self.buffer.append((pair, stored))
        if len(self.buffer) >= self.group_rows:
            self.flush()

    def table(self, rows: list[tuple[Pair, RowArrays]], hashes: list[bytes]) -> pa.Table:
        fields = {f.name: f.type for f in self.schema}
        pairs = [p for p, _ in rows]
        columns = {
            "pair_id": [p.id for p in pairs], "speaker": [p.speaker for p in pairs],
            "language": [p.language for p in pairs], "text": [p.text for p in pairs],
            "text_ids": list_array([a.text_ids for _, a in rows], np.int32, fields["text_ids"]),
            "codes": list_array([a.codes for _, a in rows], self.code_dtype, fields["codes"]),
            "condition": fixed_array([a.condition for _, a in rows], fields["condition"]),
            "emo_vec": fixed_array([a.emo_vec for _, a in rows], fields["emo_vec"]),
            "text_len": [len(a.text_ids) for _, a in rows], "code_len": [len(a.codes) for _, a in rows],
            "duration": [p.duration for p in pairs], "prompt_id": [p.prompt_id for p in pairs],
            "target_id": [p.target_id for p in pairs], "source": [p.where for p in pairs], "row_sha256": hashes,
        }
        return pa.table({k: v if isinstance(v, pa.Array) else pa.array(v, type=fields[k]) for k, v in columns.items()},
                        schema=self.schema)

    def flush(self) -> None:
        if self.buffer:
            start = len(self.row_hashes) - len(self.buffer)
            self.writer.write_table(self.table(self.buffer, self.row_hashes[start:]), row_group_size=len(self.buffer))
            self.buffer = []

    def close(self, metadata: dict | None = None) -> None:
        self.flush()
        if metadata is not None:
            self.writer.add_key_value_metadata({"fidel": json.dumps(metadata)})
        self.writer.close()


@dataclass
class SplitRecord:
    path: str
    rows: int
    content_sha256: str
    file_sha256: str
    row_groups: int
    rows_per_group: int


def content_sha256(row_hashes: list[bytes]) -> str:
    return hashlib.sha256(b"".join(row_hashes)).hexdigest()


def filter_rows(staging: Path, final: Path, keep: np.ndarray, schema: pa.Schema, metadata: dict) -> None:
    """Copy the kept rows of a staging file into the final one, row group by row group."""
    source = pq.ParquetFile(staging)
    writer = pq.ParquetWriter(final, schema, compression="zstd", compression_level=1,
                              use_dictionary=["speaker", "language"], write_statistics=["text_len", "code_len"])
    start = 0
    for group in range(source.num_row_groups):
        table = source.read_row_group(group)
        kept = table.filter(pa.array(keep[start:start + table.num_rows]))
        start += table.num_rows
        if kept.num_rows:
            writer.write_table(kept, row_group_size=kept.num_rows)
    writer.add_key_value_metadata({"fidel": json.dumps(metadata)})
    writer.close()


class DatasetBuilder(RowSink):
    """The RowSink of `fidel data build`: staging files while checking, the dataset once the report passed."""

    def __init__(self, out_dir: Path, ctx: CheckContext):
        self.out_dir = out_dir
        self.ctx = ctx
        self.float_dtype = np.dtype(FLOAT_TYPES[ctx.settings.cond_dtype][0])
        self.code_dtype = codes_dtype(ctx.codebook)
        self.schema = dataset_schema(ctx.cfg, ctx.settings.cond_dtype, self.code_dtype)
        self.group_rows = rows_per_group(ctx.cfg, ctx.settings.cond_dtype)
        self.writers: dict[str, SplitWriter] = {}

    def staging(self, split: str) -> Path:
        return self.out_dir / f".{split}.parquet.partial"

    def add(self, split: str, index: int, pair: Pair, arrays: RowArrays) -> None:
        if split not in self.writers:
            self.writers[split] = SplitWriter(self.staging(split), self.schema, self.group_rows, self.float_dtype,
                                              self.code_dtype)
        self.writers[split].add(index, pair, arrays)

    def abort(self) -> None:
        for split, writer in self.writers.items():
            writer.close()
            self.staging(split).unlink(missing_ok=True)

    def finish(self, report: DataReport) -> dict[str, SplitRecord]:
        records = {}
        for split, writer in self.writers.items():
            keep = np.isin(np.asarray(writer.indices, dtype=np.int64), report.kept[split])
            hashes = [h for h, k in zip(writer.row_hashes, keep, strict=True) if k]
            final = self.out_dir / f"{split}.parquet"
            meta = {"format": FORMAT, "split": split, "rows": len(hashes), "content_sha256": content_sha256(hashes),
                    "tokenizer_sha256": self.ctx.tokenizer_sha256, "cond_dtype": self.ctx.settings.cond_dtype,
                    "codes_dtype": str(self.code_dtype), "codebook": self.ctx.codebook,
                    "condition_shape": [self.ctx.cfg.condition_num_latent, self.ctx.cfg.model_dim],
                    "max_text_tokens": self.ctx.cfg.max_text_tokens, "max_mel_tokens": self.ctx.cfg.max_mel_tokens}
            if keep.all():
                writer.close(meta)
                os.replace(self.staging(split), final)
            else:
                writer.close()
                tmp = final.with_name(final.name + ".tmp")
                filter_rows(self.staging(split), tmp, keep, self.schema, meta)
                os.replace(tmp, final)
                self.staging(split).unlink()
            records[split] = SplitRecord(str(final.resolve()), len(hashes), meta["content_sha256"], file_sha256(final),
                                         pq.ParquetFile(final).num_row_groups, self.group_rows)
        return records


def input_fingerprint(splits: dict[str, list[str]], tokenizer: str | Path, config: str | Path,
                      settings: CheckSettings) -> str:
    """What a build depends on: manifests, tokenizer, config and check settings (not the feature files)."""
    parts = {"format": FORMAT, "tokenizer": file_sha256(tokenizer), "config": file_sha256(config),
             "settings": settings.to_dict(),
             "manifests": {k: [[str(s), file_sha256(split_manifest_spec(s)[0])] for s in v] for k, v in splits.items()}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def guard_outputs(out_dir: Path, splits: list[str]) -> None:
    """Never overwrite files fidel did not write."""
    marker = out_dir / DATASET_JSON
    for split in splits:
        final = out_dir / f"{split}.parquet"
        if final.exists() and not marker.is_file():
            raise FidelError(final, f"exists and was not written by `fidel data build` (no {DATASET_JSON} beside "
                                    "it); choose another --out")


def build_dataset(splits: dict[str, list[str]], tokenizer: str | Path, config: str | Path, out_dir: str | Path,
                  settings: CheckSettings | None = None) -> tuple[DataReport, dict | None]:
    """Check and build; returns the report and dataset.json's content (None when the checks failed)."""
    out_dir = Path(out_dir)
    settings = settings or CheckSettings()
    if settings.cond_dtype not in FLOAT_TYPES:
        raise FidelError(None, f"--cond-dtype {settings.cond_dtype!r}: choose float16 or float32")
    guard_outputs(out_dir, list(splits))
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = CheckContext.from_paths(tokenizer, config, settings)
    builder = DatasetBuilder(out_dir, ctx)
    try:
        report = run_checks(splits, ctx, builder)
    except BaseException:
        builder.abort()
        raise
    if not report.passed:
        builder.abort()
        return report, None
    return report, write_dataset(builder, report, input_fingerprint(splits, tokenizer, config, settings), config)


def write_dataset(builder: DatasetBuilder, report: DataReport, fingerprint: str, config: str | Path,
                  extra: dict | None = None) -> dict:
    """The kept rows as <split>.parquet and, last, dataset.json (fingerprint, hashes, report, `extra`)."""
    ctx, settings, out_dir = builder.ctx, builder.ctx.settings, builder.out_dir
    records = builder.finish(report)
    info = {"format": FORMAT, "fingerprint": fingerprint,
            "tokenizer": ctx.tokenizer_path, "tokenizer_sha256": ctx.tokenizer_sha256,
            "config": str(config), "config_sha256": file_sha256(config), "cond_dtype": settings.cond_dtype,
            "codes_dtype": str(builder.code_dtype),
            "condition_shape": [ctx.cfg.condition_num_latent, ctx.cfg.model_dim],
            "content_sha256": hashlib.sha256("".join(r.content_sha256 for r in records.values()).encode()).hexdigest(),
            "splits": {k: asdict(v) for k, v in records.items()}, "report": report.to_dict(), **(extra or {})}
    tmp = out_dir / (DATASET_JSON + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out_dir / DATASET_JSON)
    return info


def read_dataset_info(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / DATASET_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if info.get("format") == FORMAT else None


# ----------------------------------------------------------------------------- reading

def parquet_meta(path: Path) -> dict:
    if not path.is_file():
        raise FidelError(path, "dataset file not found (run `fidel data build`)")
    try:
        kv = pq.ParquetFile(path).metadata.metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise FidelError(path, f"not a readable Parquet file ({str(exc).splitlines()[0][:100]})") from None
    try:
        meta = json.loads(kv[b"fidel"])
    except (KeyError, json.JSONDecodeError):
        raise FidelError(path, "not a fidel dataset (no fidel metadata): build it with `fidel data build`") from None
    if meta.get("format") != FORMAT:
        raise FidelError(path, f"dataset format {meta.get('format')!r}, this fidel reads {FORMAT}: rebuild it")
    return meta


def arrow_cache(path: Path, meta: dict) -> Path | None:
    """`<name>.arrow` beside the Parquet file holding its tensor columns uncompressed; None if not writable."""
    cache = path.with_suffix(".arrow")
    if cache.is_file():
        try:
            with pa.memory_map(str(cache)) as source:
                saved = pa.ipc.open_file(source).schema.metadata or {}
            if saved.get(b"fidel_content_sha256") == meta["content_sha256"].encode():
                return cache
        except (pa.ArrowInvalid, OSError):
            pass
    source = pq.ParquetFile(path, memory_map=True)
    schema = source.schema_arrow
    schema = pa.schema([schema.field(c) for c in TENSOR_COLUMNS],
                       metadata={b"fidel_content_sha256": meta["content_sha256"].encode()})
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for group in range(source.num_row_groups):
                writer.write_table(source.read_row_group(group, columns=list(TENSOR_COLUMNS)).replace_schema_metadata(
                    schema.metadata))
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
    return cache


@dataclass
class Chunk:
    """Zero-copy numpy views of one record batch."""

    start: int
    text_offsets: np.ndarray
    text_values: np.ndarray
    code_offsets: np.ndarray
    code_values: np.ndarray
    condition: np.ndarray  # [rows, latents, dim]
    emo_vec: np.ndarray  # [rows, dim]

    @classmethod
    def of(cls, batch: pa.RecordBatch, start: int, shape: tuple[int, int]) -> Chunk:
        text, codes = batch.column("text_ids"), batch.column("codes")
        return cls(start, text.offsets.to_numpy(), text.values.to_numpy(), codes.offsets.to_numpy(),
                   codes.values.to_numpy(), batch.column("condition").flatten().to_numpy().reshape(-1, *shape),
                   batch.column("emo_vec").flatten().to_numpy().reshape(-1, shape[1]))

    def example(self, j: int) -> Example:
        t0, t1 = self.text_offsets[j], self.text_offsets[j + 1]
        c0, c1 = self.code_offsets[j], self.code_offsets[j + 1]
        return Example(torch.from_numpy(self.text_values[t0:t1].astype(np.int64)),
                       torch.from_numpy(self.code_values[c0:c1].astype(np.int64)),
                       torch.from_numpy(self.condition[j].astype(np.float32)),
                       torch.from_numpy(self.emo_vec[j].astype(np.float32)))


class ParquetPairs(torch.utils.data.Dataset):
    """Training examples from one or more `fidel data build` Parquet files, memory-mapped."""

    def __init__(self, paths: list[str | Path], tokenizer: str | Path | None = None):
        self.paths = [Path(p) for p in paths]
        self.meta = [parquet_meta(p) for p in self.paths]
        shapes = {tuple(m["condition_shape"]) for m in self.meta}
        if len(shapes) > 1:
            raise FidelError(self.paths[0], f"datasets disagree on the conditioning shape ({sorted(shapes)})")
        self.condition_shape = shapes.pop()
        if tokenizer is not None:
            sha = file_sha256(tokenizer)
            for path, meta in zip(self.paths, self.meta, strict=True):
                if meta["tokenizer_sha256"] != sha:
                    raise FidelError(path, f"built with tokenizer {meta['tokenizer_sha256'][:12]}, training uses "
                                           f"{Path(tokenizer).name} ({sha[:12]}): its text ids are stale; rebuild with "
                                           "`fidel data build`")
        self.rows = sum(m["rows"] for m in self.meta)
        self.chunks: list[Chunk] | None = None
        self.starts: np.ndarray | None = None
        self.sources: list = []

    def open(self) -> list[Chunk]:
        if self.chunks is None:
            chunks, start = [], 0
            for path, meta in zip(self.paths, self.meta, strict=True):
                cache = arrow_cache(path, meta)
                if cache is not None:
                    source = pa.memory_map(str(cache))
                    self.sources.append(source)
                    reader = pa.ipc.open_file(source)
                    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                else:  # read-only folder: decode into memory instead
                    batches = pq.read_table(path, columns=list(TENSOR_COLUMNS)).to_batches()
                for batch in batches:
                    if batch.num_rows:
                        chunks.append(Chunk.of(batch, start, self.condition_shape))
                        start += batch.num_rows
            if start != self.rows:
                raise FidelError(self.paths[0], f"holds {start} rows, its metadata says {self.rows}")
            self.chunks = chunks
            self.starts = np.array([c.start for c in chunks], dtype=np.int64)
        return self.chunks

    def __getstate__(self) -> dict:  # DataLoader workers (spawn) reopen the memory map themselves
        return {**self.__dict__, "chunks": None, "starts": None, "sources": []}

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> Example:
        chunks = self.open()
        if not 0 <= index < self.rows:
            raise IndexError(index)
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return chunks[k].example(index - chunks[k].start)

    def __getitems__(self, indices: list[int]) -> list[Example]:
        """A whole batch at once (DataLoader calls this): one float conversion per chunk, not per item."""
        chunks = self.open()
        wanted = np.asarray(indices, dtype=np.int64)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= self.rows):
            raise IndexError(f"index out of range 0..{self.rows - 1}")
        which = np.searchsorted(self.starts, wanted, side="right") - 1
        out: list[Example | None] = [None] * len(wanted)
        for k in np.unique(which):
            chunk, slots = chunks[k], np.flatnonzero(which == k)
            rows = wanted[slots] - chunk.start
            # numpy, not Tensor.float(): torch wakes its thread pool for this and pays more in waiting than converting
            condition = torch.from_numpy(chunk.condition[rows].astype(np.float32, copy=False))
            emo_vec = torch.from_numpy(chunk.emo_vec[rows].astype(np.float32, copy=False))
            for j, (slot, row) in enumerate(zip(slots.tolist(), rows.tolist(), strict=True)):
                t0, t1 = chunk.text_offsets[row], chunk.text_offsets[row + 1]
                c0, c1 = chunk.code_offsets[row], chunk.code_offsets[row + 1]
                out[slot] = Example(torch.from_numpy(chunk.text_values[t0:t1].astype(np.int64)),
                                    torch.from_numpy(chunk.code_values[c0:c1].astype(np.int64)),
                                    condition[j], emo_vec[j])
        return out

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        chunks = self.open()
        if not chunks:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return (np.concatenate([np.diff(c.text_offsets) for c in chunks]).astype(np.int64),
                np.concatenate([np.diff(c.code_offsets) for c in chunks]).astype(np.int64))

    def column(self, name: str) -> list:
        """A non-tensor column (text, speaker, pair_id, ...) of every row, read from the Parquet files."""
        return [v for p in self.paths for v in pq.read_table(p, columns=[name]).column(name).to_pylist()]


def check_training_rows(dataset: ParquetPairs, cfg: GPTConfig) -> None:
    """A Parquet dataset as training reads it: conditioning shape, text ids and codes in range (start and stop
    tokens excluded). Vectorised over each chunk; the first bad row is one line naming file and row."""
    if dataset.condition_shape != (cfg.condition_num_latent, cfg.model_dim):
        raise FidelError(dataset.paths[0], f"conditioning shape {list(dataset.condition_shape)}, this config wants "
                                           f"[{cfg.condition_num_latent}, {cfg.model_dim}]")
    codebook = min(cfg.start_mel_token, cfg.stop_mel_token)
    ends = np.cumsum([m["rows"] for m in dataset.meta])
    for chunk in dataset.open():
        for name, offsets, values, ok in (
                ("text id", chunk.text_offsets, chunk.text_values,
                 lambda v: (v >= 0) & (v < cfg.number_text_tokens) & (v != cfg.start_text_token)
                 & (v != cfg.stop_text_token)),
                ("code", chunk.code_offsets, chunk.code_values, lambda v: (v >= 0) & (v < codebook))):
            bad = np.flatnonzero(~ok(values[offsets[0]:offsets[-1]]))
            if len(bad):
                row = chunk.start + int(np.searchsorted(offsets, offsets[0] + bad[0], side="right")) - 1
                file = int(np.searchsorted(ends, row, side="right"))
                value = int(values[offsets[0] + bad[0]])
                limit = cfg.number_text_tokens if name == "text id" else codebook
                raise FidelError(dataset.paths[file], f"row {row - (ends[file - 1] if file else 0)}: {name} {value} "
                                                      f"outside 0..{limit - 1} (start and stop tokens excluded)")
