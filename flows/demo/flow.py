"""`fidel demo`: build a small Amharic corpus with espeak-ng, a tiny English base model, then run the flow.

Every step is resumable: a finished step is skipped, an interrupted training resumes from its checkpoint.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from fidel_tts.flows.demo.codec import wav_writer
from fidel_tts.flows.demo.corpus import DemoCorpus, build_demo_corpus, write_paired_manifests
from fidel_tts.flows.finetune import finetune, print_summary
from fidel_tts.tasks.report import Preempted, StageFailed, failed_state, logger
from fidel_tts.trainer.checkpoints.export import export_model, read_export_record
from fidel_tts.trainer.errors import EXIT_PREEMPTED, FidelError
from fidel_tts.trainer.model.config import write_config_yaml
from fidel_tts.trainer.text.normalize import script_letters
from fidel_tts.trainer.text.tokenizer import encode, extend_tokenizer, load_tokenizer, train_base_tokenizer
from fidel_tts.trainer.training.hooks import TrainHooks
from fidel_tts.trainer.training.options import TrainConfig
from fidel_tts.trainer.training.progress import Progress
from fidel_tts.trainer.training.trainer import train
from prefect import flow, task
from prefect.cache_policies import NO_CACHE


@dataclass
class DemoSize:
    per_speaker: int  # utterances per speaker and language
    base_vocab: int
    new_pieces: int  # unigram pieces beyond the script's letters (every letter is a piece)
    base_steps: int
    finetune_steps: int


FULL = DemoSize(per_speaker=80, base_vocab=400, new_pieces=300, base_steps=600, finetune_steps=400)
QUICK = DemoSize(per_speaker=12, base_vocab=200, new_pieces=80, base_steps=60, finetune_steps=40)

MODEL = {"model_dim": 128, "layers": 4, "heads": 4, "max_text_tokens": 200, "max_mel_tokens": 600}


def demo_config(codebook_size: int, number_text_tokens: int) -> dict:
    """An IndexTTS2-format config.yaml for the tiny demo base."""
    return {
        "gpt": {**MODEL, "use_mel_codes_as_input": True, "mel_length_compression": 1024,
                "number_text_tokens": number_text_tokens, "number_mel_codes": codebook_size + 2,
                "start_mel_token": codebook_size, "stop_mel_token": codebook_size + 1, "start_text_token": 0,
                "stop_text_token": 1, "train_solo_embeddings": False, "condition_type": "demo_stand_in"},
        "dataset": {"bpe_model": "bpe.model", "sample_rate": 16000},
        "gpt_checkpoint": "gpt.pth",
        "version": "2.0-demo",
    }


@task(name="demo-corpus", cache_policy=NO_CACHE)
def corpus_step(root: Path, size: DemoSize) -> DemoCorpus:
    return build_demo_corpus(root / "corpus", am_per_speaker=size.per_speaker, en_per_speaker=size.per_speaker,
                             cond_dim=MODEL["model_dim"])


@task(name="demo-tokenizers", cache_policy=NO_CACHE)
def tokenizer_step(root: Path, corpus: DemoCorpus, size: DemoSize) -> tuple[Path, Path]:
    base, extended = root / "base_tokenizer" / "bpe.model", root / "am_bpe.model"
    if not base.is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        train_base_tokenizer(corpus.en_text_path.read_text(encoding="utf-8").splitlines(), base, size.base_vocab)
    if not extended.is_file():
        base_size = load_tokenizer(base).get_piece_size()
        am_lines = corpus.am_text_path.read_text(encoding="utf-8").splitlines()
        extend_tokenizer(base, am_lines, extended, base_size + len(script_letters()) + size.new_pieces,
                         corpus_sources=[{"path": str(corpus.am_text_path), "lines": len(am_lines)}])
    return base, extended


@task(name="demo-manifests", cache_policy=NO_CACHE)
def manifest_step(root: Path, corpus: DemoCorpus, base_tok: Path, am_tok: Path) -> dict:
    out = root / "manifests"
    paths = {}
    for lang, records, tok in (("en", corpus.en_records, base_tok), ("am", corpus.am_records, am_tok)):
        train_path, val_path = out / f"{lang}_train.jsonl", out / f"{lang}_val.jsonl"
        if not (train_path.is_file() and val_path.is_file()):
            sp = load_tokenizer(tok)
            train_path, val_path = write_paired_manifests(records, lambda t, sp=sp: encode(sp, t), out, 0.1, 0, lang)
        paths[lang] = (train_path, val_path)
    return paths


@task(name="demo-base-model", cache_policy=NO_CACHE)
def base_model_step(root: Path, corpus: DemoCorpus, base_tok: Path, manifests: dict, size: DemoSize) -> Path:
    """Train the tiny English base from scratch, then export it as plain gpt.pth + config.yaml + bpe.model."""
    base_dir = root / "base"
    if read_export_record(base_dir):
        return base_dir
    work = root / "base_training"
    work.mkdir(parents=True, exist_ok=True)
    config = write_config_yaml(demo_config(corpus.codebook_size, load_tokenizer(base_tok).get_piece_size()),
                               work / "config.yaml")
    train_path, val_path = manifests["en"]
    tc = TrainConfig(train_manifests=[str(train_path)], val_manifests=[str(val_path)], tokenizer=str(base_tok),
                     config=str(config), output_dir=str(work / "checkpoints"), base_checkpoint=None, resume="auto",
                     max_steps=size.base_steps, batch_size=16, learning_rate=2e-3, warmup_steps=50,
                     weight_decay=0.01, log_interval=20, val_interval=max(20, size.base_steps // 6),
                     save_interval=max(20, size.base_steps // 6), keep_last=2, init="random", seed=0)
    logger().info("[demo] training the English base model (%d steps) …", size.base_steps)
    result = train(tc, TrainHooks(on_progress=progress_printer("base")))
    if result.status == "preempted":
        raise Preempted(f"base model training stopped at step {result.step}: {result.reason}")
    if result.status != "completed":
        raise StageFailed(f"base model training failed: {result.reason}")
    export_model(result.checkpoint, base_dir)
    return base_dir


def progress_printer(label: str):
    bar = {}

    def show(step: int, total: int, metrics: dict) -> None:
        if "bar" not in bar:
            bar["bar"] = Progress(label, total, initial=step, stream=sys.stdout, log=logger().info)
        bar["bar"].update(step, metrics)
        if step >= total:
            bar["bar"].close()

    return show


def write_run_file(root: Path, base_dir: Path, base_tok: Path, am_tok: Path, manifests: dict, size: DemoSize,
                   run_name: str) -> Path:
    train_path, val_path = manifests["am"]
    run = {
        "train_manifests": [str(train_path.resolve())], "val_manifests": [str(val_path.resolve())],
        "tokenizer": str(am_tok.resolve()), "base_tokenizer": str(base_tok.resolve()),
        "config": str((base_dir / "config.yaml").resolve()),
        "base_checkpoint": str((base_dir / "gpt.pth").resolve()),
        "output_dir": str((root / "runs" / run_name).resolve()), "resume": "auto", "run_name": f"demo-{run_name}",
        "train": {"max_steps": size.finetune_steps, "batch_size": 16, "learning_rate": 5e-4, "new_rows_lr": 3e-3,
                  "warmup_steps": 30, "log_interval": 10, "val_interval": max(10, size.finetune_steps // 10),
                  "save_interval": max(10, size.finetune_steps // 10), "keep_last": 3, "init": "subtoken"},
    }
    path = root / f"run-{run_name}.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False), encoding="utf-8")
    return path


@flow(name="fidel-demo")
def demo(root: str = "demo", quick: bool = False, run_name: str = "finetune") -> dict:
    """A fidel failure ends the flow run Failed with its one-line reason (a direct call raises it)."""
    try:
        summary = build_and_finetune(root, quick, run_name)
    except (FidelError, StageFailed) as exc:
        return failed_state(exc)
    for line in summary_lines(summary):
        logger().info(line)
    return summary


def build_and_finetune(root: str, quick: bool, run_name: str) -> dict:
    size = QUICK if quick else FULL
    root_path = Path(root).resolve()
    timings = {}
    started = time.monotonic()
    corpus = corpus_step(root_path, size)
    timings["corpus"] = time.monotonic() - started
    base_tok, am_tok = tokenizer_step(root_path, corpus, size)
    manifests = manifest_step(root_path, corpus, base_tok, am_tok)
    timings["tokenizers_manifests"] = time.monotonic() - started - timings["corpus"]
    base_dir = base_model_step(root_path, corpus, base_tok, manifests, size)
    timings["base_model"] = time.monotonic() - started - sum(timings.values())
    run_file = write_run_file(root_path, base_dir, base_tok, am_tok, manifests, size, run_name)
    logger().info("[demo] fine-tuning Amharic: fidel run --config %s", run_file)
    summary = finetune(run_config=str(run_file), show_progress=True,
                       render_audio=wav_writer(root_path / "corpus" / "codec.pt"))
    timings["finetune_flow"] = time.monotonic() - started - sum(timings.values())
    return {**summary, "timings": timings}


def run_demo(root: Path, run_name: str = "finetune", quick: bool = False) -> int:
    try:
        summary = demo(str(root), quick=quick, run_name=run_name)
    except Preempted as exc:
        print(f"\n[demo] interrupted: {exc}\n[demo] run the same command again to resume where it stopped.")
        return EXIT_PREEMPTED
    if summary["status"] == "already_running":
        print(f"[demo] {summary['message']}")
        return 0
    print("\n" + "\n".join(summary_lines(summary)))
    print_summary(summary)
    return 0


def summary_lines(summary: dict) -> list[str]:
    if "val_history" not in summary:  # another run holds the output dir: nothing was trained here
        return [f"[demo] {summary.get('message', summary['status'])}"]
    last = summary["val_history"][-1]
    return ["[demo] wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings"].items()),
            f"[demo] final validation: text loss {last['val_text_loss']:.3f}, mel loss {last['val_mel_loss']:.3f}"]
