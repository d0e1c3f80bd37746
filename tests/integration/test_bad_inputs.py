"""Bad inputs and faults, each a case: the exit code, fidel's one line last on stderr, no traceback, and every
file that existed before left as it was. `benchmarks/bad_inputs.py` runs the same cases and prints the table.

Cases run `flows.cli.main(argv)` in-process on a private copy of the tiny project (and of a trained output dir
where a case needs checkpoints). The few real faults (SIGKILL, SIGTERM, a second process) are subprocesses,
marked slow; full and read-only disks are small tmpfs mounts (skipped where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FIDEL = [sys.executable, "-m", "fidel_tts.flows.cli"]
TINY_STEPS = 4


# ----------------------------------------------------------------------------- the workspace a case runs in

@dataclass
class Workspace:
    root: Path
    project: object  # fixtures.synthetic.TinyProject, a private copy
    trained: Path  # a private copy of a finished tiny run (checkpoints at steps 2 and 4)
    parquet: Path  # a private copy of the project's dataset as `fidel data build` writes it
    mounts: list[Path] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.root / "out"

    def parquet_args(self, *extra) -> list[str]:
        return self.train_args(*extra, data=(self.parquet / "train.parquet", self.parquet / "val.parquet"))

    def train_args(self, *extra, out: Path | None = None, data: tuple[Path, Path] | None = None) -> list[str]:
        p = self.project
        train, val = data or (p.train_manifest, p.val_manifest)
        return ["train", "--train-manifest", str(train), "--val-manifest", str(val),
                "--tokenizer", str(p.tokenizer), "--config", str(p.base_config), "--base-checkpoint",
                str(p.base_checkpoint), "--output-dir", str(out or self.out), "--max-steps", str(TINY_STEPS),
                "--batch-size", "8", "--log-interval", "2", "--val-interval", "2", "--save-every", "2", *extra]

    # manifests and feature files
    def records(self, manifest: Path | None = None) -> list[dict]:
        path = manifest or self.project.train_manifest
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_records(self, records: list[dict], manifest: Path | None = None) -> None:
        path = manifest or self.project.train_manifest
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    def edit_record(self, index: int = 3, drop: tuple[str, ...] = (), **changes) -> None:
        records = self.records()
        records[index] = {**{k: v for k, v in records[index].items() if k not in drop}, **changes}
        self.write_records(records)

    def feature(self, role: str, index: int = 3) -> Path:
        key = {"ids": "target_text_ids_path", "codes": "target_codes_path", "cond": "prompt_condition_path",
               "emo": "prompt_emo_vec_path"}[role]
        return self.project.train_manifest.parent / self.records()[index][key]

    def save_feature(self, role: str, array: np.ndarray, index: int = 3) -> None:
        path = self.feature(role, index)
        with open(path, "wb") as handle:  # np.save(path) would append .npy to a name without it
            np.save(handle, array)

    def config(self, **gpt) -> None:
        raw = yaml.safe_load(self.project.base_config.read_text())
        raw["gpt"].update(gpt)
        self.project.base_config.write_text(yaml.safe_dump(raw))

    # run files
    def run_file(self, drop: tuple[str, ...] = (), text: str | None = None, **changes) -> list[str]:
        p = self.project
        raw = {"train_manifests": [str(p.train_manifest)], "val_manifests": [str(p.val_manifest)],
               "tokenizer": str(p.tokenizer), "base_tokenizer": str(p.base_tokenizer), "config": str(p.base_config),
               "base_checkpoint": str(p.base_checkpoint), "output_dir": str(self.out),
               "tracking_uri": f"sqlite:///{self.root}/mlruns/mlflow.db", "train": {"max_steps": TINY_STEPS}}
        raw = {**{k: v for k, v in raw.items() if k not in drop}, **changes}
        path = self.root / "run.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        return ["run", "--config", str(path)]

    def checkpoints(self) -> list[Path]:
        return sorted(self.trained.glob("ckpt-step*.pt"))

    # disks
    def tmpfs(self, name: str, size: str, read_only: bool = False) -> Path:
        folder = self.root / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
        self.mounts.append(folder)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return folder

    def unmount(self) -> None:
        for folder in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        self.mounts.clear()


@dataclass
class Case:
    name: str
    kind: str
    make: Callable[[Workspace], list[str]]  # sets the fault up and returns fidel's argv
    expect: str  # in fidel's last stderr line
    code: int = 2
    may_change: tuple[str, ...] = ()  # name patterns of files the case is meant to change (pruning, cleanup)


@dataclass
class Outcome:
    code: int
    last_line: str
    traceback: bool
    changed: list[str]
    stderr: str
    stdout: str = ""


def hashes(root: Path) -> dict[Path, str]:
    """sha256 of every file under root; the output dir's lock file is fidel's own bookkeeping (who holds it)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.name != ".fidel.lock":
            try:
                found[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                pass
    return found


def changed_files(before: dict[Path, str], may_change: tuple[str, ...]) -> list[str]:
    changed = []
    for path, digest in before.items():
        if any(path.match(pattern) for pattern in may_change):
            continue
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            changed.append(str(path))
    return changed


def run_case(case: Case, ws: Workspace) -> Outcome:
    from fidel_tts.flows.cli import main

    argv = case.make(ws)
    before = hashes(ws.root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.strip()]
    return Outcome(code, lines[-1] if lines else "", "Traceback (most recent call last)" in text,
                   changed_files(before, case.may_change), text, out.getvalue())


# ----------------------------------------------------------------------------- the cases

def flag(*extra: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: ws.train_args(*extra)


def then(setup: Callable[[Workspace], object], argv: Callable[[Workspace], list[str]] | None = None):
    """Run setup(ws), then build the argv (fidel train on the project by default)."""
    def make(ws: Workspace) -> list[str]:
        setup(ws)
        return (argv or (lambda w: w.train_args()))(ws)
    return make


def garbage(path_of: Callable[[Workspace], Path], data: bytes = b"\x00garbage\xff") -> Callable[[Workspace], None]:
    return lambda ws: path_of(ws).write_bytes(data)


def huge_header(ws: Workspace) -> None:
    """A conditioning file whose header claims 1 TiB of float32 (the header keeps its length)."""
    path = ws.feature("cond")
    data = path.read_bytes()
    size = int.from_bytes(data[8:10], "little")
    header = data[10:10 + size].replace(f"({32}, {DIM})".encode(), b"(274877906944, 1)").rstrip(b"\n ")
    path.write_bytes(data[:10] + header.ljust(size - 1) + b"\n" + data[10 + size:])


def edited_tokenizer(ws: Workspace, edit: Callable) -> Path:
    from fidel_tts.trainer.text.tokenizer import load_model_proto, write_model

    proto = load_model_proto(ws.project.tokenizer)
    edit(proto)
    path = ws.root / "edited.model"
    write_model(proto, path)
    return path


def swap_pieces(proto) -> None:
    proto.pieces[5].piece, proto.pieces[6].piece = proto.pieces[6].piece, proto.pieces[5].piece


def drop_last(proto) -> None:
    del proto.pieces[-1]


def rescore_last(proto) -> None:
    proto.pieces[-1].score += 0.5


def smaller_tokenizer(ws: Workspace) -> Path:
    """A model with fewer pieces than the base has rows: no extension of it."""
    from fidel_tts.trainer.text.tokenizer import train_base_tokenizer

    english = [line.upper() for line in ("the cat sat on the mat.", "a dog ran in the park.") * 50]
    return train_base_tokenizer(english, ws.root / "small.model", vocab_size=24)


def shifted_tokenizer(ws: Workspace) -> list[str]:
    """A tokenizer whose base pieces moved."""
    return ws.train_args("--tokenizer", str(edited_tokenizer(ws, swap_pieces)), "--base-tokenizer",
                         str(ws.project.base_tokenizer))


def corrupt(path_of: Callable[[Workspace], Path]) -> Callable[[Workspace], None]:
    def spoil(ws: Workspace) -> None:
        path = path_of(ws)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return spoil


def newest(ws: Workspace) -> Path:
    return ws.checkpoints()[-1]


def export_args(ws: Workspace, out: Path | None = None) -> list[str]:
    return ["export", str(newest(ws)), "--out", str(out or ws.root / "export")]


def moved_tokenizer_export(ws: Workspace) -> list[str]:
    """The recorded tokenizer path now holds another model: an export must not ship it."""
    shutil.copyfile(ws.project.base_tokenizer, ws.project.tokenizer)
    return export_args(ws)


def edited_config_export(ws: Workspace) -> list[str]:
    ws.project.base_config.write_text(ws.project.base_config.read_text() + "\n# edited after training\n")
    return export_args(ws)


def stale_export_temp(ws: Workspace) -> list[str]:
    out = ws.root / "export"
    out.mkdir()
    (out / ".gpt.pth.killed.tmp").write_bytes(b"half an export")
    return export_args(ws)


def resume_args(ws: Workspace, resume: str, *extra: str) -> list[str]:
    return ws.train_args("--output-dir", str(ws.trained), "--resume", resume, "--max-steps", "6", *extra)


def full_disk(ws: Workspace) -> list[str]:
    """Room for the up-front check (one checkpoint) and a save or two, not for all four."""
    from fidel_tts.trainer.training.checkpoint import latest_valid_checkpoint

    size = newest(ws).stat().st_size + newest(ws).with_suffix(".json").stat().st_size
    disk = ws.tmpfs("disk", f"{(int(size * 1.5) + (1 << 20)) // 4096 * 4096 + 4096}")
    ws.case_check = lambda: latest_valid_checkpoint(disk)[0] is not None
    return ws.train_args("--output-dir", str(disk), "--save-every", "1", "--keep-checkpoints", "5")


def train_into(folder_of: Callable[[Workspace], Path]) -> Callable[[Workspace], list[str]]:
    return lambda ws: ws.train_args("--output-dir", str(folder_of(ws)))


def under_a_file(ws: Workspace) -> Path:
    (ws.root / "a_file").write_text("x")
    return ws.root / "a_file" / "out"


def a_file(ws: Workspace) -> Path:
    (ws.root / "out_file").write_text("x")
    return ws.root / "out_file"


def record(**changes) -> Callable[[Workspace], None]:
    return lambda ws: ws.edit_record(**changes)


def feature(role: str, make_array: Callable[[Workspace], np.ndarray]) -> Callable[[Workspace], None]:
    return lambda ws: ws.save_feature(role, make_array(ws))


def codes_with(value: int) -> Callable[[Workspace], np.ndarray]:
    def make(ws: Workspace) -> np.ndarray:
        codes = np.load(ws.feature("codes")).copy()
        codes[len(codes) // 2] = value
        return codes
    return make


def text_tokens(ws: Workspace) -> int:
    from fidel_tts.trainer.text.tokenizer import load_tokenizer

    return load_tokenizer(ws.project.tokenizer).get_piece_size()


def ids_with(value: int) -> Callable[[Workspace], np.ndarray]:
    def make(ws: Workspace) -> np.ndarray:
        ids = np.load(ws.feature("ids")).copy()
        ids[0] = value
        return ids
    return make


DIM, CODEBOOK, START_MEL = 32, 64, 64
ROW = "train.jsonl:4"  # the case's bad pair is the manifest's fourth line

CASES: list[Case] = [
    # --- flags: checked when parsed, naming the flag as typed, before anything is read or written
    Case("negative learning rate", "flags", flag("--learning-rate", "-1"), "--learning-rate: must be at least 0"),
    Case("learning rate nan", "flags", flag("--learning-rate", "nan"), "--learning-rate: must be a finite number"),
    Case("learning rate inf", "flags", flag("--learning-rate", "inf"), "--learning-rate: must be a finite number"),
    Case("learning rate text", "flags", flag("--learning-rate", "fast"), "--learning-rate: expected a number"),
    Case("negative grad clip", "flags", flag("--grad-clip", "-1"), "--grad-clip: must be above 0"),
    Case("zero grad clip", "flags", flag("--grad-clip", "0"), "--grad-clip: must be above 0"),
    Case("negative text loss weight", "flags", flag("--text-loss-weight", "-0.2"),
         "--text-loss-weight: must be at least 0"),
    Case("negative mel loss weight", "flags", flag("--mel-loss-weight", "-1"), "--mel-loss-weight: must be at least 0"),
    Case("both loss weights zero", "flags", flag("--text-loss-weight", "0", "--mel-loss-weight", "0"),
         "at least one must be above 0"),
    Case("negative warmup", "flags", flag("--warmup-steps", "-5"), "--warmup-steps: must be at least 0"),
    Case("nproc 0", "flags", flag("--nproc", "0"), "--nproc: must be at least 1"),
    Case("num-workers -1", "flags", flag("--num-workers", "-1"), "--num-workers: must be at least 0"),
    Case("batch size 0", "flags", flag("--batch-size", "0"), "--batch-size: must be at least 1"),
    Case("batch size 2.5", "flags", flag("--batch-size", "2.5"), "--batch-size: expected an integer"),
    Case("grad accumulation 0", "flags", flag("--grad-accumulation", "0"), "--grad-accumulation: must be at least 1"),
    Case("epochs 0", "flags", flag("--epochs", "0"), "--epochs: must be at least 1"),
    Case("max steps negative", "flags", flag("--max-steps", "-3"), "--max-steps: must be at least 1"),
    Case("batch tokens negative", "flags", flag("--batch-tokens", "-5"), "--batch-tokens: must be at least 1"),
    Case("log interval 0", "flags", flag("--log-interval", "0"), "--log-interval: must be at least 1"),
    Case("val interval negative", "flags", flag("--val-interval", "-1"), "--val-interval: must be at least 0"),
    Case("save-every 0", "flags", flag("--save-every", "0"), "--save-every: must be at least 1"),
    Case("save-interval text", "flags", flag("--save-interval", "often"), "--save-interval: expected an integer"),
    Case("keep checkpoints negative", "flags", flag("--keep-checkpoints", "-1"),
         "--keep-checkpoints: must be at least 0"),
    Case("save minutes negative", "flags", flag("--save-minutes", "-1"), "--save-minutes: must be at least 0"),
    Case("min lr ratio 2", "flags", flag("--min-lr-ratio", "2"), "--min-lr-ratio: must be at most 1"),
    Case("negative weight decay", "flags", flag("--weight-decay", "-0.1"), "--weight-decay: must be at least 0"),
    Case("negative new rows lr", "flags", flag("--new-rows-lr", "-1"), "--new-rows-lr: must be at least 0"),
    Case("amp fp8", "flags", flag("--amp", "fp8"), "--amp: choose from off, auto, bf16, fp16"),
    Case("init zeros", "flags", flag("--init", "zeros"), "--init: choose from"),
    Case("freeze none", "flags", flag("--freeze", "none"), "--freeze: choose from"),
    Case("device gpu", "flags", flag("--device", "gpu"), "--device: not a torch device"),
    Case("negative seed", "flags", flag("--seed", "-1"), "--seed: must be at least 0"),
    Case("unknown flag", "flags", flag("--lr", "3"), "unrecognized arguments: --lr"),
    Case("flag without its value", "flags", lambda ws: [*ws.train_args(), "--epochs"], "expected one argument"),
    Case("no train manifest", "flags", lambda ws: ["train", "--val-manifest", str(ws.project.val_manifest)],
         "the following arguments are required: --train-manifest"),

    # --- manifests
    Case("manifest missing", "manifests", flag("--train-manifest", "/nonexistent/train.jsonl"), "manifest not found"),
    Case("manifest empty", "manifests", then(lambda ws: ws.project.train_manifest.write_text("")),
         "manifest has no records"),
    Case("manifest not UTF-8", "manifests",
         then(garbage(lambda ws: ws.project.train_manifest, '{"id": "é"}\n'.encode("latin-1"))), "not UTF-8"),
    Case("manifest invalid JSON", "manifests",
         then(lambda ws: ws.project.train_manifest.write_text('{"id": 1,}\n')), "line 1: invalid JSON"),
    Case("manifest truncated line", "manifests",
         then(lambda ws: ws.project.train_manifest.write_text(ws.project.train_manifest.read_text()[:-40])),
         "truncated line"),
    Case("manifest record a list", "manifests", then(lambda ws: ws.project.train_manifest.write_text("[1, 2]\n")),
         "a record must be a JSON object"),
    Case("manifest missing codes path", "manifests", then(record(drop=("target_codes_path",))),
         "line 4: missing field 'target_codes_path'"),
    Case("manifest text_len as text", "manifests", then(record(target_text_len="7")),
         "field 'target_text_len' must be integer"),
    Case("manifest negative code_len", "manifests", then(record(target_code_len=-3)),
         "field 'target_code_len' is negative"),
    Case("manifest empty path", "manifests", then(record(target_codes_path=" ")), "field 'target_codes_path' is empty"),
    Case("manifest without emotion vector", "manifests", then(record(drop=("prompt_emo_vec_path",))),
         "missing field 'prompt_emo_vec_path'"),
    Case("manifest unpaired", "manifests", then(lambda ws: ws.write_records([
        {"id": "a", "text_ids_path": "x.npy", "codes_path": "y.npy", "condition_path": "z.npy"}])),
         "unpaired manifest"),
    Case("manifest is a folder", "manifests", lambda ws: ws.train_args(data=(ws.root, ws.project.val_manifest)),
         "manifest is a folder, not a file"),
    Case("val manifest missing", "manifests", flag("--val-manifest", "/nonexistent/val.jsonl"), "manifest not found"),
    Case("parquet and JSONL mixed", "manifests",
         lambda ws: ws.train_args("--train-manifest", str(ws.root / "data.parquet")), "mixes Parquet"),
    Case("code_len disagrees with its file", "manifests", then(record(target_code_len=3)),
         f"{ROW}: pair train00003__ptrain00003: code_len_mismatch"),
    Case("text_len disagrees with its file", "manifests", then(record(target_text_len=99)),
         f"{ROW}: pair train00003__ptrain00003: target_text_len 99"),

    # --- feature files (each is one line naming manifest:line and the pair)
    Case("codes file missing", "features", then(lambda ws: ws.feature("codes").unlink()), f"{ROW}: pair"),
    Case("codes file garbage", "features", then(garbage(lambda ws: ws.feature("codes"))), "bad_npy"),
    Case("codes file empty", "features", then(garbage(lambda ws: ws.feature("codes"), b"")), "bad_npy"),
    Case("codes as floats", "features", then(feature("codes", lambda ws: np.zeros(25, np.float32))),
         "wrong_dtype"),
    Case("codes two-dimensional", "features", then(feature("codes", lambda ws: np.zeros((2, 25), np.int32))),
         "wrong_shape"),
    Case("conditioning [16, D]", "features", then(feature("cond", lambda ws: np.zeros((16, DIM), np.float32))),
         f"wrong_shape: condition file train00003.cond.npy has shape [16, {DIM}], want [32, {DIM}]"),
    Case("conditioning [32, D+1]", "features", then(feature("cond", lambda ws: np.zeros((32, DIM + 1), np.float32))),
         "wrong_shape"),
    Case("conditioning as integers", "features", then(feature("cond", lambda ws: np.zeros((32, DIM), np.int64))),
         "wrong_dtype"),
    Case("conditioning NaN", "features", then(feature("cond", lambda ws: np.full((32, DIM), np.nan, np.float32))),
         "non_finite"),
    Case("emotion vector [D+1]", "features", then(feature("emo", lambda ws: np.zeros(DIM + 1, np.float32))),
         f"want [{DIM}]"),
    Case("emotion vector inf", "features", then(feature("emo", lambda ws: np.full(DIM, np.inf, np.float32))),
         "non_finite"),
    Case("codes at the codebook size", "features", then(feature("codes", codes_with(CODEBOOK + 5))),
         "codes_out_of_range"),
    Case("code equal to the start token", "features", then(feature("codes", codes_with(START_MEL))),
         "codes_out_of_range"),
    Case("negative code", "features", then(feature("codes", codes_with(-1))), "codes_out_of_range"),
    Case("text id past the tokenizer", "features", then(feature("ids", lambda ws: ids_with(text_tokens(ws) + 3)(ws))),
         "outside this tokenizer's pieces"),
    Case("text id equal to the start token", "features", then(feature("ids", ids_with(0))), "start/stop token"),
    Case("text id equal to the stop token", "features", then(feature("ids", ids_with(1))), "start/stop token"),
    Case("text ids as floats", "features", then(feature("ids", lambda ws: np.zeros(7, np.float64))), "wrong_dtype"),
    Case("npy header claiming 1 TiB", "features", then(huge_header), "header says shape [274877906944, 1]"),
    Case("Parquet dataset with codes past this config's codebook", "features",
         then(lambda ws: ws.config(start_mel_token=40, stop_mel_token=41, number_mel_codes=42), Workspace.parquet_args),
         "gpt.pth: does not match the config"),
    Case("Parquet dataset for another width", "features", then(lambda ws: ws.config(model_dim=64),
                                                                Workspace.parquet_args),
         "gpt.pth: does not match the config"),
    Case("Parquet dataset of another tokenizer", "features",
         lambda ws: ws.parquet_args("--tokenizer", str(edited_tokenizer(ws, rescore_last))), "built with tokenizer"),
    Case("Parquet file garbage", "features", then(garbage(lambda ws: ws.parquet / "train.parquet"),
                                                  Workspace.parquet_args), "not a readable Parquet file"),
    Case("emotion file missing", "features", then(lambda ws: ws.feature("emo").unlink()), "missing_file"),
    Case("empty codes array", "features", then(feature("codes", lambda ws: np.zeros(0, np.int32))), "empty_codes"),

    # --- tokenizers
    Case("tokenizer missing", "tokenizers", flag("--tokenizer", "/nonexistent/bpe.model"),
         "tokenizer model not found"),
    Case("tokenizer garbage", "tokenizers", then(garbage(lambda ws: ws.project.tokenizer)), "not a sentencepiece model"),
    Case("tokenizer empty", "tokenizers", then(garbage(lambda ws: ws.project.tokenizer, b"")),
         "tokenizer model is empty"),
    Case("tokenizer with shifted base pieces", "tokenizers", shifted_tokenizer,
         "does not extend base tokenizer"),
    Case("base tokenizer missing", "tokenizers", flag("--base-tokenizer", "/nonexistent/base.model"),
         "tokenizer model not found"),
    Case("base tokenizer given as --tokenizer", "tokenizers",
         lambda ws: ws.train_args("--tokenizer", str(ws.project.base_tokenizer)), "text id"),
    Case("tokenizer smaller than the base", "tokenizers",
         lambda ws: ws.train_args("--tokenizer", str(smaller_tokenizer(ws))), "fewer than the base's 90"),

    # --- configs
    Case("config missing", "configs", flag("--config", "/nonexistent/config.yaml"), "config file not found"),
    Case("config not YAML", "configs", then(lambda ws: ws.project.base_config.write_text("gpt: [unclosed")),
         "config.yaml"),
    Case("config without gpt", "configs", then(lambda ws: ws.project.base_config.write_text("dataset: {}\n")),
         "config.yaml"),
    Case("config model_dim as text", "configs", then(lambda ws: ws.config(model_dim="wide")), "model_dim"),
    Case("config for another width", "configs", then(lambda ws: ws.config(model_dim=64, heads=2)),
         "gpt.pth: does not match the config"),

    # --- checkpoints
    Case("resume file missing", "checkpoints", lambda ws: resume_args(ws, str(ws.root / "gone.pt")),
         "--resume: checkpoint not found"),
    Case("resume without sidecar", "checkpoints",
         then(lambda ws: newest(ws).with_suffix(".json").unlink(), lambda ws: resume_args(ws, str(newest(ws)))),
         "no sidecar JSON"),
    Case("resume corrupt checkpoint", "checkpoints",
         then(corrupt(newest), lambda ws: resume_args(ws, str(newest(ws)))), "does not match its sidecar"),
    Case("resume sidecar not JSON", "checkpoints",
         then(lambda ws: newest(ws).with_suffix(".json").write_text("{"), lambda ws: resume_args(ws, str(newest(ws)))),
         "sidecar is not valid JSON"),
    Case("resume a folder", "checkpoints", lambda ws: resume_args(ws, str(ws.root)), "--resume: not a file"),
    Case("output dir already trained, no --resume", "checkpoints",
         lambda ws: ws.train_args("--output-dir", str(ws.trained)), "already holds checkpoints"),
    Case("resume with another tokenizer", "checkpoints",
         lambda ws: resume_args(ws, "auto", "--tokenizer", str(edited_tokenizer(ws, rescore_last))),
         "tokenizer_sha256 differs from this run's"),
    Case("resume with a tokenizer of another size", "checkpoints",
         lambda ws: resume_args(ws, "auto", "--tokenizer", str(edited_tokenizer(ws, drop_last))),
         "tokenizer_sha256 differs from this run's"),
    Case("base checkpoint missing", "checkpoints", flag("--base-checkpoint", "/nonexistent/gpt.pth"), "gpt.pth"),
    Case("base checkpoint garbage", "checkpoints", then(garbage(lambda ws: ws.project.base_checkpoint)), "gpt.pth"),
    Case("newest checkpoint corrupt: said and skipped", "checkpoints",
         then(corrupt(newest), lambda ws: resume_args(ws, "auto")), "skipping ckpt-step00000004.pt", code=0,
         may_change=("ckpt-step*",)),
    Case("export into a folder holding an export", "checkpoints",
         then(lambda ws: (ws.root / "export").mkdir() or (ws.root / "export" / "gpt.pth").write_text("mine"),
              export_args), "already holds gpt.pth (no export.json: an interrupted export?)"),
    Case("export of a missing checkpoint", "checkpoints",
         lambda ws: ["export", str(ws.root / "gone.pt"), "--out", str(ws.root / "export")], "checkpoint not found"),
    Case("export with a replaced tokenizer", "checkpoints", moved_tokenizer_export,
         "differs from the tokenizer this lineage trained with"),
    Case("export with an edited config", "checkpoints", edited_config_export,
         "differs from the config this lineage trained with"),
    Case("export after a killed export", "checkpoints", stale_export_temp, "", code=0,
         may_change=(".gpt.pth.*.tmp",)),
    Case("export into a file", "outputs", lambda ws: export_args(ws, a_file(ws)), "--out is a file, not a folder"),
    Case("export with a moved base checkpoint", "checkpoints",
         lambda ws: [*export_args(ws), "--base-checkpoint", str(ws.root / "gone" / "gpt.pth")], "gpt.pth"),

    # --- output dirs and disks
    Case("output dir is a file", "outputs", train_into(a_file), "output dir is a file, not a folder"),
    Case("output dir under a file", "outputs", train_into(under_a_file), "output dir cannot be created"),
    Case("output dir read-only", "outputs", train_into(lambda ws: ws.tmpfs("ro", "1m", read_only=True) / "out"),
         "output dir is not writable (Read-only file system)"),
    Case("disk too small for one checkpoint", "outputs", train_into(lambda ws: ws.tmpfs("tiny", "64k")),
         "one checkpoint needs about"),
    Case("disk full at a later save", "faults", full_disk, "no space left on device"),
    Case("export into a read-only folder", "outputs",
         lambda ws: export_args(ws, ws.tmpfs("ro_export", "1m", read_only=True) / "export"), "not writable"),
    Case("export into an existing read-only folder", "outputs",
         lambda ws: export_args(ws, ws.tmpfs("ro_export", "1m", read_only=True)),
         "export not written, nothing kept: cannot write: not writable (Read-only file system)"),

    # --- run.yaml: every setting checked before Prefect, MLflow or any stage starts
    Case("run file missing", "run.yaml", lambda ws: ["run", "--config", str(ws.root / "absent.yaml")],
         "run file not found"),
    Case("run file not YAML", "run.yaml", lambda ws: ws.run_file(text="train: [unclosed"), "not valid YAML"),
    Case("run file a list", "run.yaml", lambda ws: ws.run_file(text="- a\n- b\n"), "expected a mapping of settings"),
    Case("max_steps ten", "run.yaml", lambda ws: ws.run_file(train={"max_steps": "ten"}),
         "train.max_steps: expected an integer, got str 'ten'"),
    Case("train_manifests 5", "run.yaml", lambda ws: ws.run_file(train_manifests=5),
         "train_manifests: expected a list of paths"),
    Case("train given as a list", "run.yaml", lambda ws: ws.run_file(train=[1, 2]),
         "train: expected a mapping of settings, got a list"),
    Case("unknown key", "run.yaml", lambda ws: ws.run_file(epochs=3), "unknown setting(s) epochs"),
    Case("unknown train key", "run.yaml", lambda ws: ws.run_file(train={"lr": 1}), "unknown setting(s) train.lr"),
    Case("missing key", "run.yaml", lambda ws: ws.run_file(drop=("tokenizer",)), "missing setting(s) tokenizer"),
    Case("negative learning_rate", "run.yaml", lambda ws: ws.run_file(train={"learning_rate": -1}),
         "train.learning_rate: must be at least 0"),
    Case("max_bad_rows 2", "run.yaml", lambda ws: ws.run_file(max_bad_rows=2), "max_bad_rows: must be at most 1"),
    Case("empty train_manifests", "run.yaml", lambda ws: ws.run_file(train_manifests=[]),
         "train_manifests: name at least one path"),
    Case("tokenizer null", "run.yaml", lambda ws: ws.run_file(tokenizer=None), "tokenizer: expected text, got nothing"),
    Case("amp yes", "run.yaml", lambda ws: ws.run_file(train={"amp": "yes"}), "train.amp: choose from"),
    Case("keep_best as text", "run.yaml", lambda ws: ws.run_file(train={"keep_best": "no"}),
         "train.keep_best: expected true or false"),
    Case("run manifest missing", "run.yaml", lambda ws: ws.run_file(train_manifests=["gone.jsonl"]),
         "train_manifests: not found"),
    Case("run base checkpoint missing", "run.yaml", lambda ws: ws.run_file(base_checkpoint="gone.pth"),
         "base_checkpoint: not found"),
    Case("run output dir is a file", "run.yaml",
         then(a_file, lambda ws: ws.run_file(output_dir=str(ws.root / "out_file"))),
         "output dir is a file, not a folder"),
    Case("run both loss weights zero", "run.yaml",
         lambda ws: ws.run_file(train={"text_loss_weight": 0, "mel_loss_weight": 0}), "at least one must be above 0"),
]


# ----------------------------------------------------------------------------- fixtures

def train_template(project, folder: Path) -> Path:
    """A finished tiny run: checkpoints at steps 2 and 4."""
    from fidel_tts.flows.cli import main

    p = project
    argv = ["train", "--train-manifest", str(p.train_manifest), "--val-manifest", str(p.val_manifest),
            "--tokenizer", str(p.tokenizer), "--config", str(p.base_config), "--base-checkpoint",
            str(p.base_checkpoint), "--output-dir", str(folder), "--max-steps", str(TINY_STEPS), "--batch-size", "8",
            "--log-interval", "2", "--val-interval", "2", "--save-every", "2", "--keep-checkpoints", "5"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    return folder


def build_template(project, folder: Path) -> Path:
    """The project's Parquet dataset (`fidel data build`)."""
    from fidel_tts.flows.cli import main

    p = project
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "build", "--train", f"{p.train_manifest}::am", "--val", str(p.val_manifest),
                     "--tokenizer", str(p.tokenizer), "--config", str(p.base_config), "--out", str(folder)]) == 0
    return folder


def new_workspace(project_template, trained_template: Path, parquet_template: Path, root: Path) -> Workspace:
    """Private copies of the tiny project and the trained run under root, the run pointing at the copy."""
    shutil.copytree(project_template.root, root / "project")
    moved = {k: root / "project" / Path(v).relative_to(project_template.root)
             for k, v in vars(project_template).items()
             if isinstance(v, Path) and Path(v).is_relative_to(project_template.root)}
    project = replace(project_template, **moved)
    trained = root / "trained"
    shutil.copytree(trained_template, trained)
    for checkpoint in trained.glob("ckpt-step*.pt"):
        retarget(checkpoint, project)
    parquet = root / "parquet"
    shutil.copytree(parquet_template, parquet, ignore=shutil.ignore_patterns("*.arrow"))
    return Workspace(root, project, trained, parquet)


@pytest.fixture(scope="session")
def trained_template(tiny_project_template, tmp_path_factory):
    return train_template(tiny_project_template, tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture(scope="session")
def parquet_template(tiny_project_template, tmp_path_factory):
    return build_template(tiny_project_template, tmp_path_factory.mktemp("parquet") / "data")


@pytest.fixture
def workspace(tiny_project_template, trained_template, parquet_template, tmp_path):
    ws = new_workspace(tiny_project_template, trained_template, parquet_template, tmp_path)
    yield ws
    ws.unmount()


def retarget(checkpoint: Path, project) -> None:
    """Rewrite a copied checkpoint's recorded paths to the project copy (and its sidecar's hash)."""
    import torch
    from fidel_tts.trainer.files import atomic_write_json
    from fidel_tts.trainer.hashing import file_sha256
    from fidel_tts.trainer.training.checkpoint import sidecar_path

    state = torch.load(checkpoint, weights_only=False)
    state["train_config"].update(tokenizer=str(project.tokenizer), config=str(project.base_config),
                                 base_checkpoint=str(project.base_checkpoint))
    torch.save(state, checkpoint)
    meta = json.loads(sidecar_path(checkpoint).read_text())
    meta.update(sha256=file_sha256(checkpoint), size=checkpoint.stat().st_size)
    atomic_write_json(sidecar_path(checkpoint), meta)


# ----------------------------------------------------------------------------- the test

def test_the_suite_has_at_least_100_cases():
    assert len(CASES) >= 100 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, workspace: Workspace):
    outcome = run_case(case, workspace)
    assert not outcome.traceback, outcome.stderr
    assert outcome.code == case.code, outcome.stderr
    if case.code == 2:
        assert outcome.last_line.startswith("error: ") and case.expect in outcome.last_line, outcome.stderr
    elif case.expect:
        assert case.expect in outcome.last_line or case.expect in outcome.stderr, outcome.stderr
    assert outcome.changed == [], outcome.changed
    check = getattr(workspace, "case_check", None)
    assert check is None or check(), "the newest valid checkpoint did not survive"


# ----------------------------------------------------------------------------- real faults: signals, a second process

def start_training(ws: Workspace, *extra: str) -> subprocess.Popen:
    """A long `fidel train` in its own process, started once its first step is logged."""
    args = [*ws.train_args("--max-steps", "100000", "--log-interval", "1", *extra)]
    proc = subprocess.Popen(FIDEL + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if line.startswith("saved ") or time.monotonic() > deadline:
            break
    return proc


def finish(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def sigkill_mid_save(ws: Workspace) -> Outcome:
    """SIGKILL while checkpoints are written every step; the same command with --resume auto continues."""
    proc = start_training(ws, "--save-every", "1", "--keep-checkpoints", "2")
    time.sleep(0.5)
    finish(proc, signal.SIGKILL)
    from fidel_tts.trainer.training.checkpoint import latest_valid_checkpoint

    saved, _ = latest_valid_checkpoint(ws.out)
    step = int(saved.stem.removeprefix("ckpt-step"))
    resume = Case("", "", lambda w: w.train_args("--resume", "auto", "--max-steps", str(step + 2)), "",
                  may_change=("ckpt-step*", ".ckpt-step*.tmp"))  # pruned as --keep-checkpoints says; the
    # killed write's temp file is removed
    outcome = run_case(resume, ws)
    leftovers = [p.name for p in ws.out.glob(".ckpt-step*.tmp")]
    return replace(outcome, changed=outcome.changed + leftovers)


def sigterm_keep_zero(ws: Workspace) -> Outcome:
    """--keep-checkpoints 0 then SIGTERM: the checkpoint announced is the one kept, and the resume starts there."""
    proc = start_training(ws, "--keep-checkpoints", "0", "--save-every", "3")
    code, err = finish(proc, signal.SIGTERM)
    from fidel_tts.trainer.training.checkpoint import latest_valid_checkpoint

    saved, _ = latest_valid_checkpoint(ws.out)
    lines = [line for line in err.splitlines() if line.strip()]
    if code != 75 or saved is None:
        return Outcome(code, lines[-1] if lines else "", "Traceback (most recent call last)" in err, [], err)
    step = int(saved.stem.removeprefix("ckpt-step"))
    resume = Case("", "", lambda w: w.train_args("--resume", "auto", "--max-steps", str(step + 1),
                                                 "--keep-checkpoints", "0"), "", may_change=("ckpt-step*",))
    outcome = run_case(resume, ws)
    resumed = step > 0 and f"completed at step {step + 1}/" in outcome.stdout
    return replace(outcome, last_line=f"resumed from step {step}" if resumed else outcome.last_line)


def concurrent_train(ws: Workspace) -> Outcome:
    """A second `fidel train` into the output dir another one is writing: one line, nothing touched."""
    proc = start_training(ws, "--save-every", "1000")
    try:
        return run_case(Case("", "", lambda w: w.train_args("--resume", "auto"), ""), ws)
    finally:
        finish(proc, signal.SIGTERM)


def sigkill_mid_export(ws: Workspace) -> Outcome:
    """SIGKILL an export at some point of its run; the next export into that folder then works or says why."""
    out = ws.root / "export"
    proc = subprocess.Popen(FIDEL + export_args(ws, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not any(out.glob(".gpt.pth.*.tmp")):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    if (out / "export.json").exists():  # it finished first: start over from the folder it left
        shutil.rmtree(out)
    return run_case(Case("", "", lambda w: export_args(w, out), "", may_change=(".gpt.pth.*.tmp",)), ws)


# name, kind, run, exit code, in the last stderr line
FAULTS = [
    ("SIGKILL mid-save, then --resume auto", "faults", sigkill_mid_save, 0, ""),
    ("--keep-checkpoints 0, SIGTERM, resume", "faults", sigterm_keep_zero, 0, "resumed from step"),
    ("two fidel train on one output dir", "faults", concurrent_train, 2, "in use by another fidel"),
    ("SIGKILL mid-export, export again", "faults", sigkill_mid_export, 0, ""),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kind, run, code, expect", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault(name, kind, run, code, expect, workspace: Workspace):
    outcome = run(workspace)
    assert not outcome.traceback, outcome.stderr
    assert outcome.code == code, outcome.stderr
    assert expect in outcome.last_line, (outcome.last_line, outcome.stderr)
    assert outcome.changed == [], outcome.changed


def test_data_check_flags_one_id_with_two_contents(workspace: Workspace):
    from fidel_tts.trainer.data.checks import check_manifests

    records = workspace.records()
    records[5]["id"] = records[2]["id"]
    workspace.write_records(records)
    p = workspace.project
    report = check_manifests({"train": [str(p.train_manifest)]}, p.tokenizer, p.base_config)
    found = [f for f in report.findings if f.check == "id_conflict"]
    assert [(f.line, f.pair_id, f.action) for f in found] == [(6, records[2]["id"], "dropped")]
    assert "train.jsonl:3" in found[0].detail and "target_text" in found[0].detail


def test_a_save_refused_by_a_read_only_disk_is_one_line_and_leaves_the_newest(workspace: Workspace):
    import torch
    from fidel_tts.trainer.errors import FidelError
    from fidel_tts.trainer.training.checkpoint import latest_valid_checkpoint, save_checkpoint

    disk = workspace.tmpfs("disk", "1m")
    save_checkpoint(disk, 1, {"x": torch.zeros(4)}, {})
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(FidelError) as refused:
        save_checkpoint(disk, 2, {"x": torch.ones(4)}, {})
    assert "not writable (Read-only file system)" in str(refused.value) and "ckpt-step00000001.pt is intact" in str(
        refused.value)
    assert latest_valid_checkpoint(disk)[0].name == "ckpt-step00000001.pt"
