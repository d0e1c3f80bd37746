"""The run file (`fidel run --config run.yaml`): what to train on, from what, into where."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from fidel_tts.trainer.data.manifest import split_manifest_spec
from fidel_tts.trainer.data.prepare import PREPARE_PATHS, PrepareSettings
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model.config import read_yaml
from fidel_tts.trainer.options import check, from_mapping, option, same_as, section
from fidel_tts.trainer.training.build import check_base_tokenizer
from fidel_tts.trainer.training.options import LaunchOptions, TrainConfig

INPUTS = ("tokenizer", "base_tokenizer", "config", "base_checkpoint")


@dataclass
class RunSpec:
    """The run file's settings, each defined once (trainer/training/options.py): run.yaml is checked against them."""

    train_manifests: list[str] = same_as(TrainConfig, "train_manifests")
    val_manifests: list[str] = same_as(TrainConfig, "val_manifests")
    tokenizer: str = same_as(TrainConfig, "tokenizer")
    base_tokenizer: str = same_as(TrainConfig, "base_tokenizer")
    config: str = same_as(TrainConfig, "config")
    base_checkpoint: str = same_as(TrainConfig, "base_checkpoint")
    output_dir: str = same_as(TrainConfig, "output_dir")
    resume: str = same_as(TrainConfig, "resume", default="auto")
    train: dict = section(TrainConfig, help="TrainConfig settings (the train.* keys)")
    launch: dict = section(LaunchOptions, help="LaunchOptions (the launch.* keys): processes per machine, and "
                                               "machines, for the training stage")
    max_bad_rows: float = option(0.05, help="share of rows the data checks may drop before the run stops",
                                 flag=None, min=0, max=1)
    min_script_share: float | None = option(0.5, help="least share of the expected script in each text (unset: "
                                                      "no check)", flag=None, min=0, max=1)
    tracking_uri: str = option("sqlite:///mlruns/mlflow.db", help="the MLflow tracking store", flag=None)
    experiment: str = option("fidel", help="the MLflow experiment", flag=None)
    run_name: str | None = option(None, help="the MLflow run's name", flag=None)
    enforce_inference_smoke: bool = option(False, help="the inference-smoke gate fails the run instead of only "
                                                       "reporting", flag=None)
    prepare: dict = section(PrepareSettings, help="PrepareSettings (the prepare.* keys): features from audio as "
                                                  "the first stage; the manifests then list id, text, audio, speaker")

    def __post_init__(self):
        check(self)

    def train_config(self, data_dir: Path | None = None, mlflow_run_id: str | None = None) -> TrainConfig:
        """Training reads the Parquet dataset the data stage built when given its folder."""
        train = [str(data_dir / "train.parquet")] if data_dir else self.train_manifests
        val = [str(data_dir / "val.parquet")] if data_dir else self.val_manifests
        return TrainConfig(train_manifests=train, val_manifests=val, tokenizer=self.tokenizer, config=self.config,
                           output_dir=self.output_dir, base_checkpoint=self.base_checkpoint, resume=self.resume,
                           base_tokenizer=self.base_tokenizer,
                           mlflow_run_id=mlflow_run_id, **self.train)

    def check_inputs(self) -> None:
        """Every input file there and readable, before any stage starts."""
        manifests = [(name, split_manifest_spec(m)[0]) for name in ("train_manifests", "val_manifests")
                     for m in getattr(self, name)]
        for key, path in [*((k, Path(getattr(self, k))) for k in INPUTS), *manifests]:
            if not path.is_file():
                raise FidelError(path, f"{key}: {'not a file' if path.exists() else 'not found'}")
            try:
                path.open("rb").close()
            except OSError as exc:
                raise FidelError(path, f"{key}: not readable ({exc.strerror})") from None
        if self.prepare:
            PrepareSettings(**self.prepare).models.files()  # the weights the prepare stage loads
        check_base_tokenizer(self.train_config())  # exit 2 here, not a failed verification after MLflow

    def launch_options(self, node_rank: int | None = None) -> LaunchOptions:
        """launch.*, with this machine's node rank when the flow is given one (one run file for every node)."""
        return LaunchOptions(**{**self.launch, **({} if node_rank is None else {"node_rank": node_rank})})

    def to_dict(self) -> dict:
        return asdict(self)


def load_run_spec(path: str | Path) -> RunSpec:
    """Read run.yaml; relative paths resolve against the file's folder."""
    path = Path(path)
    return run_spec_from_dict(read_yaml(path, "run file"), path)


def run_spec_from_dict(raw: dict, path: Path | None = None) -> RunSpec:
    """Every setting checked (types, ranges, unknown and missing keys) before anything runs."""
    values = from_mapping(RunSpec, raw, path)
    folder = path.parent if path else Path(".")

    def resolve(value: str) -> str:
        head, sep, lang = str(value).partition("::")
        return str((folder / head).resolve()) + (sep + lang if sep else "")

    spec = RunSpec(**values)
    for name in ("train_manifests", "val_manifests"):
        setattr(spec, name, [resolve(v) for v in getattr(spec, name)])
    for name in ("tokenizer", "base_tokenizer", "config", "base_checkpoint", "output_dir"):
        setattr(spec, name, resolve(getattr(spec, name)))
    if spec.resume not in (None, "", "auto"):  # a checkpoint file, like every other path of the run file
        spec.resume = resolve(spec.resume)
    if spec.prepare:
        spec.prepare.update({k: resolve(spec.prepare[k]) for k in PREPARE_PATHS})
        try:
            PrepareSettings(**spec.prepare)  # rules across settings
        except FidelError as exc:
            raise FidelError(path, f"prepare: {exc.problem}") from None
    try:
        spec.launch_options()  # rules across settings: node_rank below nnodes, an endpoint for several
    except FidelError as exc:
        raise FidelError(path, exc.problem) from None
    try:
        spec.train_config()  # rules across settings (TrainConfig's own check)
    except FidelError as exc:
        raise FidelError(path, f"train: {exc.problem}") from None
    return spec
