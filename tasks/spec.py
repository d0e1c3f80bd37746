"""The run file (`fidel run --config run.yaml`): what to train on, from what, into where."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from trainer.errors import FidelError
from trainer.train import TrainConfig

REQUIRED = ("train_manifests", "val_manifests", "tokenizer", "base_tokenizer", "config", "base_checkpoint",
            "output_dir")
TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {
    "train_manifests", "val_manifests", "tokenizer", "config", "output_dir", "base_checkpoint", "resume",
    "mlflow_run_id"}


@dataclass
class RunSpec:
    train_manifests: list[str]
    val_manifests: list[str]
    tokenizer: str
    base_tokenizer: str
    config: str
    base_checkpoint: str
    output_dir: str
    resume: str = "auto"
    train: dict = field(default_factory=dict)  # TrainConfig fields
    max_bad_rows: float = 0.05
    min_script_share: float | None = 0.5
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "fidel"
    run_name: str | None = None
    enforce_inference_smoke: bool = False  # the inference-smoke gate fails the run instead of only reporting

    def train_config(self, data_dir: Path | None = None, mlflow_run_id: str | None = None) -> TrainConfig:
        """Training reads the Parquet dataset the data stage built when given its folder."""
        train = [str(data_dir / "train.parquet")] if data_dir else self.train_manifests
        val = [str(data_dir / "val.parquet")] if data_dir else self.val_manifests
        return TrainConfig(train_manifests=train, val_manifests=val, tokenizer=self.tokenizer, config=self.config,
                           output_dir=self.output_dir, base_checkpoint=self.base_checkpoint, resume=self.resume,
                           mlflow_run_id=mlflow_run_id, **self.train)

    def to_dict(self) -> dict:
        return asdict(self)


def load_run_spec(path: str | Path) -> RunSpec:
    """Read run.yaml; relative paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FidelError(path, "run file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FidelError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise FidelError(path, "expected a mapping of settings")
    return run_spec_from_dict(raw, path)


def run_spec_from_dict(raw: dict, path: Path | None = None) -> RunSpec:
    known = {f.name for f in fields(RunSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise FidelError(path, f"unknown setting(s) {', '.join(unknown)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise FidelError(path, f"missing setting(s) {', '.join(missing)}")
    bad_train = sorted(set(raw.get("train") or {}) - TRAIN_KEYS)
    if bad_train:
        raise FidelError(path, f"unknown train setting(s) {', '.join(bad_train)}")
    folder = path.parent if path else Path(".")

    def resolve(value: str) -> str:
        head, sep, lang = str(value).partition("::")
        return str((folder / head).resolve()) + (sep + lang if sep else "")

    spec = RunSpec(**{**raw, "train": dict(raw.get("train") or {})})
    for name in ("train_manifests", "val_manifests"):
        value = getattr(spec, name)
        setattr(spec, name, [resolve(v) for v in ([value] if isinstance(value, str) else value)])
    for name in ("tokenizer", "base_tokenizer", "config", "base_checkpoint", "output_dir"):
        setattr(spec, name, resolve(getattr(spec, name)))
    return spec
