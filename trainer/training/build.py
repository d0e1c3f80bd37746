"""Everything a run needs before its first step: the model (extended from the base), the resume decision, the
checks that refuse bad inputs before any work, and the lineage a checkpoint carries."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from fidel_tts.trainer.data.checks import check_training_pairs
from fidel_tts.trainer.data.manifest import BucketBatchSampler
from fidel_tts.trainer.data.parquet import check_training_rows
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.config import GPTConfig, load_gpt_config, read_config_yaml
from fidel_tts.trainer.model.gpt import UnifiedVoiceGPT
from fidel_tts.trainer.model.vocab import InitRecord, extended_model
from fidel_tts.trainer.model.weights import (
    base_checkpoint_rows_hash,
    load_base_checkpoint,
    model_base_rows_hash,
)
from fidel_tts.trainer.process import Dist
from fidel_tts.trainer.text.tokenizer import check_base_pieces, load_model_proto, load_tokenizer
from fidel_tts.trainer.training.checkpoint import (
    is_fidel_checkpoint,
    latest_valid_checkpoint,
    read_sidecar,
    verify_checkpoint,
)
from fidel_tts.trainer.training.distributed import any_rank, from_rank0
from fidel_tts.trainer.training.options import TrainConfig

FROZEN_BUFFERS = ("text_embedding.base", "text_head.base_weight", "text_head.base_bias")


def trainable_state(model: UnifiedVoiceGPT) -> dict:
    return {k: v for k, v in model.state_dict().items() if k not in FROZEN_BUFFERS}


def load_trainable(model: UnifiedVoiceGPT, trainable: dict) -> UnifiedVoiceGPT:
    """A checkpoint's trainable state into a model built from the base (its frozen rows are the base's)."""
    frozen = {k: v for k, v in model.state_dict().items() if k in FROZEN_BUFFERS}
    model.load_state_dict({**trainable, **frozen})
    return model


@dataclass
class Setup:
    cfg: GPTConfig
    model: UnifiedVoiceGPT
    base_rows: int
    base_hash: str
    init: InitRecord | None


def build_model(tc: TrainConfig) -> Setup:
    tokenizer = load_tokenizer(tc.tokenizer)
    config = load_gpt_config(tc.config)
    cfg = config.with_text_tokens(tokenizer.get_piece_size())
    torch.manual_seed(tc.seed)
    if tc.base_checkpoint is None:
        model = UnifiedVoiceGPT(cfg, base_rows=0, freeze=tc.freeze, duration_control=tc.duration_control,
                                activation_checkpointing=tc.activation_checkpointing)
        return Setup(cfg, model, 0, model_base_rows_hash(model), None)
    base = load_base_checkpoint(tc.base_checkpoint, config, read_config_yaml(tc.config)["gpt"])
    base_rows = base.base_rows
    if cfg.number_text_tokens < base_rows:
        raise FidelError(tc.tokenizer, f"has {cfg.number_text_tokens} pieces, fewer than the base's {base_rows}")
    model, init = extended_model(base, cfg, base_rows, tc.init, tc.seed, tokenizer, tc.freeze, tc.duration_control)
    model.set_activation_checkpointing(tc.activation_checkpointing)
    base_hash = base_checkpoint_rows_hash(base, base_rows)
    return Setup(cfg, model, base_rows, base_hash, init)


ForeignResume = Callable[[TrainConfig, Path, Callable[[str], None]], Path]


def resolve_resume(tc: TrainConfig, warn: Callable[[str], None] = lambda message: None,
                   on_foreign: ForeignResume | None = None) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run. on_foreign turns another trainer's checkpoint
    into a fidel one to resume from (fidel train: triaged and imported once); without it such a file is refused."""
    out = Path(tc.output_dir)
    if tc.resume is None:
        newest, _ = latest_valid_checkpoint(out)
        if newest is not None:
            raise FidelError(out, f"already holds checkpoints (newest {newest.name}); pass --resume auto to "
                                  "continue, or choose a new --output-dir")
        return None
    if tc.resume == "auto":
        newest, rejected = latest_valid_checkpoint(out)
        for path, problem in rejected:
            warn(f"skipping {path.name}, newer than the checkpoint resumed: {problem}")
        return newest
    path = Path(tc.resume)
    if not path.is_file():
        raise FidelError(path, "--resume: checkpoint not found" if not path.exists() else "--resume: not a file")
    if on_foreign is not None and not is_fidel_checkpoint(path):  # rank 0 only (from_rank0): imported once
        return on_foreign(tc, path, warn)
    verify_checkpoint(path)  # before any work, not after the model is built
    return path


def resume_on_every_rank(tc: TrainConfig, env: Dist, device: torch.device, warn: Callable[[str], None],
                         on_foreign: ForeignResume | None = None) -> Path | None:
    """Rank 0 decides fresh or resume (and from which checkpoint); every rank loads that file, so the output dir
    must be one folder that every machine sees."""
    resume_path = from_rank0(lambda: resolve_resume(tc, warn, on_foreign), env)
    if any_rank(resume_path is not None and not resume_path.is_file(), env, device):
        raise FidelError(resume_path, "rank 0 resumes from it but another rank cannot read it: --output-dir must be "
                                      "a folder every machine shares")
    return resume_path


def check_output_dir(out: Path) -> None:
    """The output dir is a folder we can write in, or one we can create: checked before any work."""
    if out.exists() and not out.is_dir():
        raise FidelError(out, "output dir is a file, not a folder")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise FidelError(out, f"output dir cannot be created: {existing} is a file")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # os.access says yes to root on a read-only mount
    except OSError as exc:
        raise FidelError(out, f"output dir is not writable ({exc.strerror})") from None


def with_default_base_tokenizer(tc: TrainConfig, warn: Callable[[str], None]) -> TrainConfig:
    """No base tokenizer given: the bpe.model beside the base checkpoint, when it has the base config's number of
    text tokens, is the base's own (the IndexTTS2 release keeps them side by side), so the extension's base
    pieces are checked against it."""
    if tc.base_tokenizer is not None or tc.base_checkpoint is None:
        return tc
    beside = Path(tc.base_checkpoint).parent / "bpe.model"
    if not beside.is_file() or beside.resolve() == Path(tc.tokenizer).resolve():
        return tc
    if load_tokenizer(beside).get_piece_size() != load_gpt_config(tc.config).number_text_tokens:
        return tc  # not the base's: an extended tokenizer kept beside it, say
    warn(f"base tokenizer: {beside} (beside the base checkpoint; --base-tokenizer to choose another)")
    return dataclasses.replace(tc, base_tokenizer=str(beside))


def check_base_tokenizer(tc: TrainConfig) -> None:
    """With the base tokenizer known, the extended one must keep its pieces at the same ids."""
    if tc.base_tokenizer is None:
        return
    line = check_base_pieces(load_model_proto(tc.tokenizer), load_model_proto(tc.base_tokenizer))
    if not line.passed:
        raise FidelError(tc.tokenizer, f"does not extend base tokenizer {tc.base_tokenizer}: {line.value} "
                                       f"({line.reason}); its base rows would be trained on the wrong pieces")


def checkpoint_bytes(model: UnifiedVoiceGPT) -> int:
    """About one checkpoint: the trainable tensors and AdamW's two moments of each, in float32, plus slack."""
    trainable = sum(t.numel() * 4 for t in trainable_state(model).values())
    return trainable * 3 + (1 << 20)


def check_free_space(out: Path, model: UnifiedVoiceGPT) -> None:
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    free, need = shutil.disk_usage(existing).free, checkpoint_bytes(model)
    if free < need:
        raise FidelError(out, f"{free / 2**20:.1f} MiB free, one checkpoint needs about {need / 2**20:.1f} MiB: "
                              "free some space or choose another output dir")


def check_rows(data, cfg: GPTConfig) -> None:
    """Every row training will read, checked as `fidel data check` checks it: a bad one is manifest:line."""
    if data.source == "jsonl":
        check_training_pairs([*data.train_set.pairs, *data.val_set.pairs], cfg)
    else:
        check_training_rows(data.train_set, cfg)
        check_training_rows(data.val_set, cfg)


def recorded_config(tc: TrainConfig) -> dict:
    """The config a checkpoint keeps, with absolute paths: an export from another folder finds the same files."""
    paths = {k: str(Path(v).absolute()) for k in ("tokenizer", "config", "base_checkpoint", "base_tokenizer")
             if (v := getattr(tc, k))}
    return {**tc.to_dict(), **paths}


def lineage_of(tc: TrainConfig, setup: Setup, env: Dist, total_steps: int) -> dict:
    return {
        "id": uuid.uuid4().hex,
        "base_checkpoint": tc.base_checkpoint,
        "base_rows": setup.base_rows,
        "text_rows": setup.cfg.text_rows,
        "base_rows_sha256": setup.base_hash,
        "tokenizer_sha256": file_sha256(tc.tokenizer),
        "config_sha256": file_sha256(tc.config),
        "freeze": tc.freeze,
        "duration_control": tc.duration_control,
        "init": setup.init.to_dict() if setup.init else None,
        "mlflow_run_id": tc.mlflow_run_id,
        "schedule_total_steps": total_steps,  # the LR schedule's length, fixed for the lineage
        "effective_batch": effective_batch(tc, env),
        "batch_changes": [],
    }


def effective_batch(tc: TrainConfig, env: Dist) -> dict:
    batch = {"batch_size": tc.batch_size, "grad_accumulation": tc.grad_accumulation, "world": env.world}
    # only when set, so that lineages from before the token budget compare equal
    return {**batch, "batch_tokens": tc.batch_tokens} if tc.batch_tokens else batch


def check_lineage(saved: dict, fresh: dict, path: Path) -> None:
    for key in ("base_rows_sha256", "tokenizer_sha256", "text_rows", "freeze"):
        if saved.get(key) != fresh.get(key):
            raise FidelError(path, f"{key} differs from this run's ({saved.get(key)} vs {fresh.get(key)}): "
                                   "not the same lineage")


def check_resume_inputs(path: Path, tc: TrainConfig, setup: Setup) -> None:
    """The checkpoint to resume was trained with this tokenizer and base: said naming the checkpoint, before any
    row is read (a tokenizer of another size would otherwise show as a row's id out of range)."""
    side = read_sidecar(path)
    fresh = {"base_rows_sha256": setup.base_hash, "tokenizer_sha256": file_sha256(tc.tokenizer), "freeze": tc.freeze}
    recorded = [key for key in fresh if key in side]
    check_lineage({k: side[k] for k in recorded}, {k: fresh[k] for k in recorded}, path)


def convert_position(micro: int, old_plan_len: int, new_plan_len: int, group: int) -> int:
    """Same share of the epoch under a new batch plan, rounded down to a whole step."""
    return int(micro / max(1, old_plan_len) * new_plan_len) // group * group


def apply_batch_change(lineage: dict, tc: TrainConfig, env: Dist, epoch: int, step: int, micro: int,
                       saved_config: dict, data, warn: Callable[[str], None]) -> int:
    """A resume with another effective batch (another GPU, say): allowed, warned, and written into the lineage.
    Returns the position in the epoch's new plan."""
    old, new = lineage["effective_batch"], effective_batch(tc, env)
    old_plan_len = len(BucketBatchSampler(*data.train_set.lengths(), old["batch_size"], seed=saved_config["seed"],
                                          max_tokens=saved_config.get("batch_tokens")).epoch_batches(epoch))
    new_plan_len = len(data.sampler.epoch_batches(epoch))
    converted = convert_position(micro, old_plan_len, new_plan_len, new["world"] * new["grad_accumulation"])
    rule = ("LR schedule kept in optimizer steps (schedule_total_steps unchanged); learning rate unchanged; "
            f"position in epoch {epoch} converted by share: micro-batch {micro}/{old_plan_len} → "
            f"{converted}/{new_plan_len}")
    lineage["batch_changes"] = [*lineage.get("batch_changes", []),
                                {"step": step, "from": old, "to": new, "rule": rule}]
    lineage["effective_batch"] = new
    warn(f"effective batch changed at step {step}: {old} → {new}; {rule}")
    return converted
