"""The training and launch options (TrainConfig, LaunchOptions), defined with the option machinery of
trainer/options.py: each one once, with its flag, run.yaml key, default, range and help."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model.gpt import FREEZE_MODES
from fidel_tts.trainer.model.vocab import INIT_METHODS
from fidel_tts.trainer.options import check, option
from fidel_tts.trainer.process import device_problem


@dataclass
class TrainConfig:
    """What training uses (trainer/training/). Paths are top-level run.yaml keys (tasks/spec.py RunSpec), the
    rest go under `train:`."""

    train_manifests: list[str] = option(
        help="paired JSONL manifests (PATH or PATH::lang) or the Parquet dataset of `fidel data build`; repeat "
             "the flag for several", flag="--train-manifest", yaml=False)
    val_manifests: list[str] = option(help="validation manifests, as --train-manifest", flag="--val-manifest",
                                      yaml=False)
    tokenizer: str = option(help="the extended sentencepiece model", yaml=False,
                            flag_default="checkpoints/bpe.model")
    config: str = option(help="IndexTTS2 config.yaml of the base", yaml=False, flag_default="checkpoints/config.yaml")
    output_dir: str = option(help="where checkpoints go", yaml=False, flag_default="trained_checkpoints")
    base_checkpoint: str | None = option(
        None, help="the base gpt.pth (unset: train from scratch with no base rows, as the demo's base model)",
        yaml=False, flag_default="checkpoints/gpt.pth")
    base_tokenizer: str | None = option(
        None, help="the base sentencepiece model: when given, the tokenizer must keep its pieces at the same ids",
        yaml=False)
    resume: str | None = option(None, help="a checkpoint path (a community trainer's is triaged, then imported "
                                           "once), or 'auto' for the newest valid one (unset: fresh)", yaml=False)
    epochs: int = option(10, help="passes over the training data (when max_steps is unset)", min=1)
    max_steps: int | None = option(None, help="optimizer steps to train to (unset: epochs decide)", min=1,
                                   zero_means_unset=True)
    batch_size: int = option(8, help="pairs per micro-batch", min=1)
    batch_tokens: int | None = option(
        None, help="token budget per micro-batch: length-bucketed batches grow while pairs × (longest text + "
                   "longest codes) fits, up to 4 × batch size", min=1)
    grad_accumulation: int = option(1, help="micro-batches per optimizer step on each process", min=1)
    learning_rate: float = option(2e-5, help="peak learning rate", min=0)
    new_rows_lr: float | None = option(None, help="learning rate of the new text rows (unset: learning rate)", min=0)
    weight_decay: float = option(0.01, help="AdamW weight decay (never on the frozen base rows)", min=0)
    warmup_steps: int = option(100, help="linear warmup steps before the cosine decay", min=0)
    min_lr_ratio: float = option(0.1, help="the cosine decay's floor, as a share of the learning rate", min=0, max=1)
    grad_clip: float = option(1.0, help="gradient norm clipping", above=0)
    text_loss_weight: float = option(0.2, help="weight of the text cross-entropy", min=0)
    mel_loss_weight: float = option(0.8, help="weight of the semantic-code cross-entropy", min=0)
    log_interval: int = option(10, help="steps between training log lines and metrics", min=1)
    val_interval: int = option(500, help="steps between validations (0: once per epoch)", min=0)
    save_interval: int = option(500, help="steps between checkpoints", min=1, flag="--save-every",
                                aliases=("--save-interval",))
    save_minutes: float = option(0.0, help="also save when this many minutes passed since the last save (0: off)",
                                 min=0)
    keep_last: int = option(3, help="checkpoints kept besides the best (the newest is always kept)", min=0,
                            flag="--keep-checkpoints", aliases=("--keep-last",))
    keep_best: bool = option(True, help="keep the checkpoint with the best validation loss beside the last ones")
    async_save: bool = option(True, help="write checkpoints in the background; the loop waits only for a CPU "
                                         "snapshot")
    amp: str = option("off", help="mixed precision on CUDA: auto picks bf16 where supported, else fp16 with "
                                  "GradScaler (a bare --amp: auto)", choices=("off", "auto", "bf16", "fp16"),
                      const="auto")
    init: str = option("subtoken", help="new text rows: mean of transliterated base sub-tokens, base mean, or "
                                        "random (benchmarks/init_compare.py)", choices=INIT_METHODS)
    freeze: str = option("split", help="split: base rows are frozen buffers; hooks: the community trainers' "
                                       "gradient hooks, for comparison only", choices=FREEZE_MODES)
    duration_control: bool = option(False, help="train the duration slot on the target code length "
                                                "(speed_emb(0) with p=0.3)")
    activation_checkpointing: bool = option(False, help="recompute each block in backward: less memory, more "
                                                        "compute", aliases=("--grad-checkpointing",))
    compile: bool = option(False, help="torch.compile the backbone blocks (dynamic shapes; the first steps pay "
                                       "the compile)")
    seed: int = option(1234, help="seed of init, shuffling and dropout", min=0)
    num_workers: int = option(0, help="DataLoader worker processes", min=0)
    device: str = option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N", check=device_problem)
    mlflow_run_id: str | None = option(None, help="the MLflow run training reports to (set by the flow)",
                                       flag=None, yaml=False)

    def __post_init__(self):
        check(self)
        if self.text_loss_weight == 0 and self.mel_loss_weight == 0:
            raise FidelError(None, "text_loss_weight and mel_loss_weight: at least one must be above 0")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- how `fidel train` starts its processes


def endpoint_problem(text: str | None) -> str | None:
    host, _, port = (text or "").rpartition(":")
    if text is not None and not (host and port.isdigit() and 0 < int(port) < 65536):
        return f"expected HOST:PORT (node 0's address and a free port), got {text!r}"
    return None


@dataclass
class LaunchOptions:
    """How training starts its processes: `fidel train` flags, and the `launch:` section of run.yaml."""

    nproc: int = option(1, help="processes (GPUs) on this machine, via torchrun and DDP", min=1)
    nnodes: int = option(1, help="machines in the job; each runs the same command with its own node rank", min=1)
    node_rank: int = option(0, help="this machine's number, 0 to nnodes - 1; node 0 holds rank 0, which saves and "
                                    "reports", min=0)
    rdzv_endpoint: str | None = option(None, help="HOST:PORT of torchrun's c10d rendezvous, on node 0 (needed "
                                                  "when nnodes > 1)", check=endpoint_problem)
    freeze_conditioning: bool = option(False, help="accepted for compatibility: fidel never trains the "
                                                   "conditioning encoders", yaml=False)

    def __post_init__(self):
        check(self)
        if self.node_rank >= self.nnodes:
            raise FidelError(None, f"--node-rank (launch.node_rank) {self.node_rank}: must be below --nnodes "
                                   f"{self.nnodes}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise FidelError(None, f"--nnodes (launch.nnodes) {self.nnodes}: needs --rdzv-endpoint HOST:PORT, node "
                                   "0's address")

    @property
    def distributed(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1

