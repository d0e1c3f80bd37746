"""`fidel prepare`: manifests of audio + transcript + speaker → the Parquet dataset that training reads.

1. Manifests: JSONL or CSV with the community's fields `id, text, audio, speaker` (and `language`); audio paths
   resolve against the manifest's folder; `PATH::am` sets the language. Every problem with them, the tokenizer,
   the config or the model files stops here, before any work (FidelError).
2. Features, shard by shard (trainer.data.features): a split's utterances sorted by id, `shard_size` per shard;
   rank r of W (torchrun) takes shards r, r+W, .... A shard's clips are read and checked (dropped rows keep
   their reason), sorted by length and run in batches; the shard is written as `shards/<split>-<k>.arrow` and
   recorded done by `shards/<split>-<k>.json`, each atomically. A SIGTERM finishes the batch, keeps the shard's
   finished batches (`.partial.arrow`) and returns "preempted" (exit 75); the same command skips done shards
   and resumes a partial one after its last batch, with the same batches, so the result is the same.
3. The dataset (rank 0, when every shard is done): pairs within speakers (`fidel data pair`'s pick_prompts),
   text normalised and tokenised with the extended tokenizer, the data checks' row and dataset checks, then
   `<split>.parquet` and dataset.json (trainer.data.parquet), as `fidel data build` writes them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from fidel_tts.trainer.data.checks import (
    DROPPED,
    CheckContext,
    CheckSettings,
    DataReport,
    Row,
    RowArrays,
    RowFacts,
    Tokens,
    checked_report,
    code_problems,
    float_problem,
    text_problems,
)
from fidel_tts.trainer.data.features import (
    AudioLimits,
    FeatureModels,
    ModelPaths,
    check_codec,
    clip_features,
    found_model_paths,
    read_audio,
    require_upstream,
)
from fidel_tts.trainer.data.manifest import Pair, pick_prompts, read_manifest_lines, split_manifest_spec
from fidel_tts.trainer.data.parquet import DatasetBuilder, guard_outputs, read_dataset_info, write_dataset
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.files import atomic_write_bytes, atomic_write_json
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.config import read_config_yaml
from fidel_tts.trainer.options import check, option
from fidel_tts.trainer.process import Dist, StopRequest, device_problem, resolve_device

UTTERANCE_FIELDS = ("id", "text", "audio", "speaker")
PREPARE_PATHS = ("checkpoint_dir", "w2v_bert", "codec")  # resolved against run.yaml's folder
SHARDS = "shards"
FEATURES_JSON = "features.json"
AUDIO_THREADS = 4


@dataclass
class PrepareSettings:
    """The `prepare:` section of run.yaml and the flags of `fidel prepare`, defined once (trainer/training/options.py)."""

    checkpoint_dir: str = option(help="the IndexTTS2 checkpoint folder: config.yaml, gpt.pth (its conformers and "
                                      "perceivers give the conditioning), wav2vec2bert_stats.pt")
    # run.yaml names both (its paths resolve against its folder, tasks/spec.py); the flags default to finding them
    w2v_bert: str = option(help="the facebook/w2v-bert-2.0 folder: config.json, preprocessor_config.json, "
                                "model.safetensors (flag default: found in --checkpoint-dir's hf_cache)",
                           flag_default="")
    codec: str = option(help="the MaskGCT semantic codec weights (amphion/MaskGCT semantic_codec/model.safetensors; "
                             "flag default: found in --checkpoint-dir's hf_cache)", flag_default="")
    batch_size: int = option(16, help="clips per w2v-BERT batch (length-sorted)", min=1)
    shard_size: int = option(256, help="clips per shard: the unit recorded done", min=1)
    min_seconds: float = option(0.5, help="shorter clips are dropped", min=0)
    max_seconds: float = option(20.0, help="longer clips are dropped", above=0)
    silence_dbfs: float = option(-60.0, help="clips with an RMS level below this are dropped", max=0)
    max_clipped: float = option(0.001, help="clips with a larger share of samples at full scale are dropped", min=0,
                                max=1)
    pairs_per_target: int = option(2, help="prompts drawn per target, from its speaker's other clips", min=1)
    seed: int = option(0, help="seed of the prompt draw")
    device: str = option("auto", help="auto, cpu or cuda (under torchrun: one GPU per rank)", check=device_problem)
    cond_dtype: str = option("float16", help="storage of conditioning and emotion vectors",
                             choices=("float16", "float32"))

    def __post_init__(self):
        check(self)
        if self.min_seconds >= self.max_seconds:
            raise FidelError(None, f"min_seconds {self.min_seconds:g} must be below max_seconds {self.max_seconds:g}")

    @property
    def models(self) -> ModelPaths:
        return self.found_models()[0]

    def found_models(self) -> tuple[ModelPaths, list[str]]:
        """The model paths, and a line for each found in the checkpoint folder's hf_cache rather than given."""
        return found_model_paths(Path(self.checkpoint_dir), self.w2v_bert, self.codec)

    @property
    def limits(self) -> AudioLimits:
        return AudioLimits(self.min_seconds, self.max_seconds, self.silence_dbfs, self.max_clipped)


@dataclass(frozen=True)
class Utterance:
    id: str
    text: str
    audio: Path
    speaker: str
    language: str
    manifest: Path
    line: int


@dataclass
class PrepareResult:
    status: str  # completed | preempted | failed | shards_done (a rank other than 0)
    out_dir: str
    clips: int = 0  # clips run through the models by this call
    seconds: float = 0.0
    dropped: list[dict] = field(default_factory=list)  # utterances dropped before features, with the reason
    report: DataReport | None = None
    info: dict | None = None
    reused: bool = False


# ----------------------------------------------------------------------------- manifests

def manifest_records(path: Path) -> list[tuple[int, dict]]:
    if path.suffix.lower() != ".csv":
        return read_manifest_lines(path)
    if not path.is_file():
        raise FidelError(path, "manifest not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            records = [(reader.line_num, dict(row)) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FidelError(path, f"not a readable UTF-8 CSV ({str(exc)[:100]})") from None
    if not records:
        raise FidelError(path, "manifest has no records")
    return records


def read_utterances(spec: str | Path) -> list[Utterance]:
    path, lang = split_manifest_spec(spec)
    utterances = []
    for number, record in manifest_records(path):
        missing = [k for k in UTTERANCE_FIELDS if k not in record or record[k] in (None, "")]
        if missing:
            hint = (" (a paired manifest: give it to `fidel data build`, not prepare)"
                    if "target_codes_path" in record else "")
            raise FidelError(path, f"line {number}: missing field(s) {', '.join(missing)}{hint}")
        utterances.append(Utterance(str(record["id"]), str(record["text"]), path.parent / str(record["audio"]),
                                    str(record["speaker"]), lang or str(record.get("language") or ""), path, number))
    return utterances


def read_splits(splits: dict[str, list[str]]) -> dict[str, list[Utterance]]:
    """Every split's utterances sorted by id; an id twice (in any split) is a bad input."""
    seen: dict[str, Utterance] = {}
    out = {}
    for name, specs in splits.items():
        utterances = [u for spec in specs for u in read_utterances(spec)]
        for u in utterances:
            if u.id in seen:
                first = seen[u.id]
                raise FidelError(u.manifest, f"line {u.line}: id {u.id!r} already at {first.manifest}:{first.line}; "
                                             "ids name the shards and pairs, so they must be unique")
            seen[u.id] = u
        out[name] = sorted(utterances, key=lambda u: u.id)
    return out


# ----------------------------------------------------------------------------- fingerprints

def file_stamp(path: Path) -> list:
    """Small files by content; multi-GB weights by size and modification time (hashing them costs minutes)."""
    stat = path.stat()
    return [path.name, file_sha256(path)] if stat.st_size < (64 << 20) else [path.name, stat.st_size, stat.st_mtime_ns]


def digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def features_fingerprint(splits: dict[str, list[str]], settings: PrepareSettings, model_files: dict[str, Path]) -> str:
    """What the shards depend on: manifests, model files, audio limits and the shard layout. The batch size is part
    of it: padding in a w2v-BERT batch moves the features by float rounding (about 1e-6), so another batch size
    gives other bytes and must not resume these shards."""
    def manifest(spec: str) -> list:  # content and `::lang`, not how the path is spelled
        path, lang = split_manifest_spec(spec)
        return [file_sha256(path), lang]

    return digest({"manifests": {k: [manifest(s) for s in v] for k, v in splits.items()},
                   "models": {k: file_stamp(p) for k, p in sorted(model_files.items())},
                   "limits": asdict(settings.limits), "shard_size": settings.shard_size,
                   "batch_size": settings.batch_size})


def dataset_fingerprint(features: str, tokenizer: str | Path, config: str | Path, settings: PrepareSettings,
                        checks: CheckSettings) -> str:
    return digest({"features": features, "tokenizer": file_sha256(tokenizer), "config": file_sha256(config),
                   "checks": checks.to_dict(), "pairs_per_target": settings.pairs_per_target, "seed": settings.seed})


# ----------------------------------------------------------------------------- shards

def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def shard_schema(dim: int, latents: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("duration", pa.float64()), ("codes", pa.list_(pa.int32())),
                      ("condition", pa.list_(pa.float32(), latents * dim)), ("emo_vec", pa.list_(pa.float32(), dim))])


def write_arrow(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    rows = sorted(rows, key=lambda r: r["id"])
    dim = schema.field("emo_vec").type.list_size
    flat = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "duration": pa.array([r["duration"] for r in rows], pa.float64()),
        "codes": pa.array([r["codes"].astype(np.int32) for r in rows], pa.list_(pa.int32())),
        "condition": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([r["condition"].reshape(-1) for r in rows]) if rows else np.zeros(0, np.float32)),
            schema.field("condition").type.list_size),
        "emo_vec": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([r["emo_vec"] for r in rows]) if rows else np.zeros(0, np.float32)), dim),
    }
    batch = pa.record_batch(list(flat.values()), schema=schema)

    def write(handle):
        with pa.ipc.new_file(handle, schema) as writer:
            writer.write_batch(batch)

    atomic_write_bytes(path, write)


def read_arrow(path: Path) -> pa.RecordBatch:
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    return reader.get_batch(0)


def rows_of(batch: pa.RecordBatch) -> list[dict]:
    """Rows of a shard file as numpy arrays (zero-copy views into the memory map where possible)."""
    ids = batch.column("id").to_pylist()
    latents_dim = batch.schema.field("condition").type.list_size
    dim = batch.schema.field("emo_vec").type.list_size
    condition = batch.column("condition").flatten().to_numpy().reshape(-1, latents_dim // dim, dim)
    emo = batch.column("emo_vec").flatten().to_numpy().reshape(-1, dim)
    codes = batch.column("codes")
    offsets, values = codes.offsets.to_numpy(), codes.values.to_numpy()
    durations = batch.column("duration").to_numpy()
    return [{"id": uid, "duration": float(durations[i]), "codes": values[offsets[i]:offsets[i + 1]],
             "condition": condition[i], "emo_vec": emo[i]} for i, uid in enumerate(ids)]


@dataclass
class ShardJob:
    split: str
    index: int
    utterances: list[Utterance]
    folder: Path

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def done_path(self) -> Path:
        return self.folder / f"{self.name}.json"

    @property
    def data_path(self) -> Path:
        return self.folder / f"{self.name}.arrow"

    @property
    def partial_path(self) -> Path:
        return self.folder / f"{self.name}.partial.arrow"


def shard_jobs(utterances: dict[str, list[Utterance]], shard_size: int, folder: Path) -> list[ShardJob]:
    return [ShardJob(split, k, utts[start:start + shard_size], folder)
            for split, utts in utterances.items() for k, start in enumerate(range(0, len(utts), shard_size))]


def run_shard(job: ShardJob, models: FeatureModels, settings: PrepareSettings, schema: pa.Schema, stop,
              on_batch: Callable[[int], None]) -> bool:
    """Whether the shard finished (else a stop was asked for and its finished batches are kept). The batches are a
    function of the shard's audio alone, so a resumed shard computes the batches the interrupted run had not,
    exactly as an uninterrupted run would."""
    rows = rows_of(read_arrow(job.partial_path)) if job.partial_path.is_file() else []
    have = {r["id"] for r in rows}
    loaded, dropped = [], []
    with ThreadPoolExecutor(AUDIO_THREADS) as pool:  # decoding and resampling release the GIL
        audio = list(pool.map(lambda u: read_audio(u.audio, settings.limits), job.utterances))
    for u, (wave, problem) in zip(job.utterances, audio, strict=True):
        if problem:
            dropped.append({"id": u.id, "where": f"{u.manifest}:{u.line}", "check": problem[0], "detail": problem[1]})
        else:
            loaded.append((u, wave))
    loaded.sort(key=lambda item: (len(item[1].speaker), item[0].id))
    for start in range(0, len(loaded), settings.batch_size):
        batch = loaded[start:start + settings.batch_size]
        if all(u.id in have for u, _ in batch):
            continue
        for (u, audio), clip in zip(batch, clip_features(models, [a for _, a in batch]), strict=True):
            rows.append({"id": u.id, "duration": audio.seconds, "codes": clip.codes,
                         "condition": clip.condition, "emo_vec": clip.emo_vec})
        on_batch(len(batch))
        if stop.requested and start + settings.batch_size < len(loaded):
            write_arrow(job.partial_path, rows, schema)
            return False
    write_arrow(job.data_path, rows, schema)
    atomic_write_json(job.done_path, {"rows": len(rows), "dropped": dropped, "bytes": job.data_path.stat().st_size,
                                      "sha256": file_sha256(job.data_path)})
    job.partial_path.unlink(missing_ok=True)
    return True


def read_done(job: ShardJob) -> dict | None:
    try:
        done = json.loads(job.done_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not job.data_path.is_file() or job.data_path.stat().st_size != done.get("bytes"):
        return None  # not the shard file recorded (both are written atomically): compute it again
    return done


# ----------------------------------------------------------------------------- the dataset

def pair_rows(split: str, utterances: list[Utterance], features: dict[str, dict], tokens: Tokens, ctx: CheckContext,
              settings: PrepareSettings, builder: DatasetBuilder) -> list[Row]:
    """Pairs within speakers, each through the data checks' row checks; usable rows go to the builder."""
    by_id = {u.id: u for u in utterances}
    by_speaker: dict[str, list[str]] = {}
    for u in utterances:
        if u.id in features:
            by_speaker.setdefault(u.speaker, []).append(u.id)
    picked, _ = pick_prompts(by_speaker, settings.pairs_per_target, settings.seed)
    rows = []
    for index, (speaker, target_id, prompt_id) in enumerate(picked):
        target, prompt = by_id[target_id], by_id[prompt_id]
        codes, source = features[target_id]["codes"], features[prompt_id]
        pair = Pair(id=f"{target_id}__{prompt_id}", speaker=speaker, language=target.language, text=target.text,
                    text_ids_path=target.manifest, codes_path=target.audio, condition_path=prompt.audio,
                    emo_vec_path=prompt.audio, text_len=0, code_len=len(codes), prompt_id=prompt_id,
                    target_id=target_id, duration=features[target_id]["duration"], manifest=target.manifest,
                    line=target.line, prompt_speaker=prompt.speaker, target_audio_path=target.audio,
                    prompt_audio_path=prompt.audio)
        facts = RowFacts(duration=pair.duration)
        ids = tokens.ids.get(target.text)
        found = text_problems(pair, ids, tokens.share.get(target.text), None, ctx, facts)
        found += code_problems(pair, codes, ctx, facts)
        found += [problem for role in ("condition", "emo_vec")
                  if (problem := float_problem(role, f"of prompt {prompt_id}", source[role], ctx))]
        row = Row(split, index, pair, facts)
        for name, detail in found:
            row.add(name, detail)
        if not any(f.action == DROPPED for f in row.findings):
            builder.add(split, index, pair, RowArrays(ids, codes, source["condition"], source["emo_vec"]))
        rows.append(row)
    return rows


def build_prepared(splits: dict[str, list[str]], utterances: dict[str, list[Utterance]], jobs: list[ShardJob],
                   ctx: CheckContext, config: str | Path, out_dir: Path, settings: PrepareSettings,
                   fingerprint: str, dropped: list[dict]) -> tuple[DataReport, dict | None]:
    features: dict[str, dict] = {}
    for job in jobs:
        features.update({r["id"]: r for r in rows_of(read_arrow(job.data_path))})
    tokens = Tokens.of({u.text for utts in utterances.values() for u in utts}, ctx)
    builder = DatasetBuilder(out_dir, ctx)
    try:
        split_rows = {name: pair_rows(name, utts, features, tokens, ctx, settings, builder)
                      for name, utts in utterances.items()}
        report = checked_report(splits, split_rows, ctx)
    except BaseException:
        builder.abort()
        raise
    total = sum(len(u) for u in utterances.values())
    report.fatal += [f"{name}: no pairs (no speaker has two usable utterances in it)"
                     for name, rows in split_rows.items() if not rows]
    if dropped and len(dropped) / total > ctx.settings.max_bad_rows:
        report.fatal.append(f"{len(dropped)} of {total} utterances dropped before features "
                            f"({len(dropped) / total:.1%} > --max-bad-rows {ctx.settings.max_bad_rows:.1%})")
    if not report.passed:
        builder.abort()
        return report, None
    counts = Counter(d["check"] for d in dropped)
    extra = {"prepare": {"utterances": total, "dropped": len(dropped), "dropped_by_check": dict(counts),
                         "dropped_rows": dropped, "settings": asdict(settings)}}
    return report, write_dataset(builder, report, fingerprint, config, extra)


# ----------------------------------------------------------------------------- the whole job

def rank_env() -> Dist:
    """torchrun's rank and world; the ranks share nothing but the output folder, so no process group."""
    return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))


def prepare_device(name: str, env: Dist) -> torch.device:
    """Training's device rule (one GPU per rank); CUDA asked for where there is none is a bad input."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FidelError(None, f"device {name!r}: CUDA is not available here")
    return resolve_device(name, env)


def claim_shards(out_dir: Path, fingerprint: str) -> Path:
    """The shard folder, tied to the inputs it was computed from: other inputs never mix into it."""
    folder = out_dir / SHARDS
    record = folder / FEATURES_JSON
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8")).get("fingerprint")
        if saved != fingerprint:
            raise FidelError(out_dir, "holds features prepared from other manifests, models, audio limits, shard "
                                      "size or batch size; choose another output folder (nothing is overwritten)")
    else:
        atomic_write_json(record, {"fingerprint": fingerprint})
    return folder


def compute_shards(jobs: list[ShardJob], settings: PrepareSettings, device: torch.device, ctx: CheckContext, stop,
                   on_batch: Callable[[int, int], None] | None) -> int:
    """Features of the shards (of this rank) not done yet, until a stop is asked for; returns the clips computed."""
    todo = [job for job in jobs if read_done(job) is None]
    if not todo:
        return 0
    models = FeatureModels.load(settings.models, device)
    schema = shard_schema(models.model_dim, ctx.cfg.condition_num_latent)
    total, done = sum(len(job.utterances) for job in todo), 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if on_batch is not None:
            on_batch(done, total)

    for job in todo:
        if not run_shard(job, models, settings, schema, stop, progress) or stop.requested:
            break
    return done


def wait_for_shards(jobs: list[ShardJob], stop) -> bool:
    """Rank 0: True once every rank's shards are recorded done, False if a stop is asked for first."""
    while not all(read_done(job) is not None for job in jobs):
        if stop.requested:
            return False
        time.sleep(1.0)
    return True


def prepare(splits: dict[str, list[str]], tokenizer: str | Path, config: str | Path, out_dir: str | Path,
            settings: PrepareSettings, checks: CheckSettings | None = None,
            on_batch: Callable[[int, int], None] | None = None, stop=None) -> PrepareResult:
    """Features for every utterance, then the paired, checked Parquet dataset in out_dir.

    on_batch(clips done, clips to do) after each batch. stop: an object with `.requested` (default: SIGTERM and
    SIGINT ask for a stop after the batch, a second one exits at once)."""
    out_dir = Path(out_dir)
    checks = checks or CheckSettings(cond_dtype=settings.cond_dtype)
    env = rank_env()
    require_upstream()
    model_files = settings.models.files()
    check_codec(read_config_yaml(model_files["config"])["semantic_codec"], model_files["codec"])
    guard_outputs(out_dir, list(splits))
    utterances = read_splits(splits)
    ctx = CheckContext.from_paths(tokenizer, config, checks)
    base = read_config_yaml(model_files["config"])["gpt"]
    if base.get("model_dim") != ctx.cfg.model_dim:
        raise FidelError(model_files["config"], f"gpt.model_dim {base.get('model_dim')} but the training config "
                                                f"{config} has {ctx.cfg.model_dim}: conditioning would not fit")
    device = prepare_device(settings.device, env)
    features_fp = features_fingerprint(splits, settings, model_files)
    fingerprint = dataset_fingerprint(features_fp, tokenizer, config, settings, checks)
    info = read_dataset_info(out_dir)
    if info is not None and info.get("fingerprint") == fingerprint and all(
            Path(r["path"]).is_file() for r in info["splits"].values()):
        return PrepareResult("completed", str(out_dir), info=info, reused=True)
    jobs = shard_jobs(utterances, settings.shard_size, claim_shards(out_dir, features_fp))
    started = time.monotonic()
    with StopRequest() if stop is None else nullcontext(stop) as stopper:
        computed = compute_shards(jobs[env.rank::env.world], settings, device, ctx, stopper, on_batch)
        if stopper.requested or (env.main and not wait_for_shards(jobs, stopper)):
            return PrepareResult("preempted", str(out_dir), computed, time.monotonic() - started)
    if not env.main:
        return PrepareResult("shards_done", str(out_dir), computed, time.monotonic() - started)
    dropped = [d for job in jobs for d in read_done(job)["dropped"]]
    report, info = build_prepared(splits, utterances, jobs, ctx, config, out_dir, settings, fingerprint, dropped)
    return PrepareResult("completed" if info else "failed", str(out_dir), computed, time.monotonic() - started,
                         dropped, report, info)

