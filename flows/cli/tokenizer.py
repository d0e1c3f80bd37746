"""`fidel tokenizer extend`, `fidel tokenizer verify` and `fidel text normalize`.

flows/cli/__init__.py calls add_commands(sub) with the object returned by ArgumentParser().add_subparsers().
Each command returns an exit code: 0 all passed, 1 a verification line failed, 2 a bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model.config import read_config_yaml
from fidel_tts.trainer.report import print_report
from fidel_tts.trainer.text.normalize import normalize_text
from fidel_tts.trainer.text.tokenizer import MAX_SIZE, extend_tokenizer, read_corpus_files, verify_tokenizer


def read_config_text_tokens(path: Path) -> int:
    """gpt.number_text_tokens from an IndexTTS config.yaml."""
    value = read_config_yaml(path)["gpt"].get("number_text_tokens")
    if not isinstance(value, int) or isinstance(value, bool):
        raise FidelError(path, f"gpt.number_text_tokens missing or not an integer (got {value!r})")
    return value


def read_checkpoint_text_rows(path: Path) -> int:
    """Rows of text_embedding.weight in a GPT checkpoint (a state dict, or one under "model")."""
    import torch

    if not path.is_file():
        raise FidelError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        raise FidelError(path, f"cannot load checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    keys = [k for k in state if str(k).endswith("text_embedding.weight")] if isinstance(state, dict) else []
    if not keys:
        raise FidelError(path, "checkpoint has no text_embedding.weight")
    return int(state[keys[0]].shape[0])


def show_verify_report(report, json_path: Path | None) -> int:
    print_report(report.lines)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0 if report.passed else 1


def target_size(value: str) -> int | str:
    """--size: a whole number of pieces or "max"."""
    if value == MAX_SIZE:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a whole number nor {MAX_SIZE}") from None


def run_extend(args: argparse.Namespace) -> int:
    texts, sources = read_corpus_files(args.corpus)
    record = extend_tokenizer(args.base, texts, args.out, args.size, lang_tag=args.lang_tag,
                              corpus_sources=sources, seed=args.seed, fold=args.fold_same_sound)
    tag = f" + tag {record.lang_tag} (id {record.lang_tag_id})" if record.lang_tag else ""
    print(f"wrote {record.out_path}: {record.target_size} pieces = base {record.base_size} + "
          f"{record.script_chars_added} script characters{tag} + {record.unigram_pieces_added} unigram pieces")
    print(f"record {Path(record.out_path).with_suffix('.json')}")
    report = verify_tokenizer(args.out, args.base, texts)
    return show_verify_report(report, None)


def run_verify(args: argparse.Namespace) -> int:
    texts, _ = read_corpus_files(args.corpus)
    config_tokens = read_config_text_tokens(args.config) if args.config else None
    checkpoint_rows = read_checkpoint_text_rows(args.checkpoint) if args.checkpoint else None
    report = verify_tokenizer(args.tokenizer, args.base, texts, config_text_tokens=config_tokens,
                              checkpoint_text_rows=checkpoint_rows, max_unused_share=args.max_unused_share)
    return show_verify_report(report, args.json)


def run_normalize(args: argparse.Namespace) -> int:
    """The text as training encodes it: one normalised line per line of stdin, or for the joined arguments."""
    lines = [" ".join(args.text)] if args.text else sys.stdin.read().splitlines()
    for line in lines:
        print(normalize_text(line, fold=args.fold_same_sound))
    return 0


def add_commands(subparsers) -> None:
    text = subparsers.add_parser("text", help="text as fidel's tokenizer and training see it")
    text_commands = text.add_subparsers(dest="text_command", required=True)
    normalize = text_commands.add_parser(
        "normalize", help="print fidel-normalised text (numerals spelled out, Ge'ez punctuation mapped, upper case)")
    normalize.add_argument("text", nargs="*", help="the text (joined by spaces); without it, each line of stdin")
    normalize.add_argument("--fold-same-sound", action="store_true", help="ሐ ኀ -> ሀ, ሠ -> ሰ, ዐ -> አ, ፀ -> ጸ")
    normalize.set_defaults(func=run_normalize)

    tokenizer = subparsers.add_parser("tokenizer", help="extend the base tokenizer to a new script, or verify one")
    commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)

    extend = commands.add_parser("extend", help="append script characters and corpus unigram pieces to a base")
    extend.add_argument("--base", type=Path, required=True, help="base sentencepiece model (bpe.model)")
    extend.add_argument("--corpus", type=Path, nargs="+", required=True, help="UTF-8 text files, one line each")
    extend.add_argument("--size", type=target_size, required=True,
                        help="exact vocabulary size of the result, e.g. 24000, or max: all the corpus supports")
    extend.add_argument("--lang-tag", default=None, help="add a language tag piece, e.g. AM for ▁[AM]")
    extend.add_argument("--out", type=Path, required=True, help="output .model (.vocab and .json written beside)")
    extend.add_argument("--seed", type=int, default=0)
    extend.add_argument("--fold-same-sound", action="store_true",
                        help="normalise ሐ ኀ to ሀ, ሠ to ሰ, ዐ to አ, ፀ to ጸ (changes spelling; recorded with the tokenizer)")
    extend.set_defaults(func=run_extend)

    verify = commands.add_parser("verify", help="check an extended tokenizer against its base")
    verify.add_argument("--tokenizer", type=Path, required=True, help="extended sentencepiece model")
    verify.add_argument("--base", type=Path, required=True, help="base sentencepiece model (bpe.model)")
    verify.add_argument("--corpus", type=Path, nargs="+", required=True, help="target-language text files")
    verify.add_argument("--config", type=Path, default=None, help="config.yaml with gpt.number_text_tokens")
    verify.add_argument("--checkpoint", type=Path, default=None, help="GPT checkpoint with text_embedding.weight")
    verify.add_argument("--max-unused-share", type=float, default=0.9)
    verify.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    verify.set_defaults(func=run_verify)
