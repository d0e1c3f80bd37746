"""Compare fidel's tokenizer extension with the community recipe on the same Amharic corpus.

fidel: script characters + unigram pieces with log-prob scores appended to the official base (trainer/text/tokenizer.py).
community: train a BPE sentencepiece model on the corpus and append its pieces in order, with their BPE scores
(-rank), skipping pieces the base has and never adding single Ethiopic characters.

Corpus: every word of `aspell -d am dump master` three times (bare, with a prefix clitic, with a suffix clitic),
nine words a sentence. Held-out: the same words with prefix and suffix together, a form the corpus never shows.

Run: .venv/bin/python -m benchmarks.tokenizer_compare [--base tests/data/bpe.model] [--size 24000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fidel_tts.trainer.text.normalize import normalize_text
from fidel_tts.trainer.text.tokenizer import (
    NORMAL,
    extend_tokenizer,
    load_model_proto,
    processor_from_proto,
    train_in_memory,
    verify_tokenizer,
    write_model,
)
from sentencepiece import sentencepiece_model_pb2 as model_pb2

PREFIXES = ("የ", "በ", "ለ", "ከ", "እንደ")
SUFFIXES = ("ን", "ም", "ና", "ው", "ዎች", "ህ")


def aspell_words() -> list[str]:
    out = subprocess.run(["aspell", "-d", "am", "dump", "master"], capture_output=True, text=True, check=True)
    return sorted({w.split("/")[0] for w in out.stdout.split()})


def sentences_of(forms: list[list[str]]) -> list[str]:
    sentences = []
    for form, stride in zip(forms, (1, 7, 13, 17), strict=False):
        n = len(form)
        order = [form[(i * stride) % n] for i in range(n)]
        for i in range(0, n, 9):
            group = order[i:i + 9]
            sentences.append(" ".join(group[:4]) + "፣ " + " ".join(group[4:]) + "።")
    return sentences


def corpora(words: list[str]) -> tuple[list[str], list[str]]:
    train = sentences_of([words,
                          [PREFIXES[i % 5] + w for i, w in enumerate(words)],
                          [w + SUFFIXES[i % 6] for i, w in enumerate(words)]])
    held_out = sentences_of([[PREFIXES[(i + 2) % 5] + w + SUFFIXES[(i + 3) % 6] for i, w in enumerate(words)]])
    return train, held_out


def community_extension(base_path: Path, texts: list[str], out_path: Path, target_size: int) -> Path:
    base = load_model_proto(base_path)
    known = {p.piece for p in base.pieces}
    lines = [normalize_text(t) for t in texts]
    bpe = train_in_memory(lines, "community", model_type="bpe", vocab_size=target_size - len(base.pieces) + 400,
                          character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1,
                          hard_vocab_limit=False)
    out = model_pb2.ModelProto()
    out.CopyFrom(base)
    for p in bpe.pieces:
        if len(out.pieces) >= target_size:
            break
        if p.type == NORMAL and len(p.piece) > 1 and p.piece not in known:
            out.pieces.add(piece=p.piece, score=p.score, type=NORMAL)
    write_model(out, out_path)
    return out_path


def measure(model_path: Path, base_size: int, texts: list[str]) -> dict:
    proto = load_model_proto(model_path)
    sp = processor_from_proto(proto)
    lines = [normalize_text(t) for t in texts]
    encoded = [sp.encode(line, out_type=int) for line in lines]
    tokens = sum(map(len, encoded))
    words = sum(len(line.split()) for line in lines)
    unk = sum(ids.count(sp.unk_id()) for ids in encoded)
    new = {i for i in range(base_size, len(proto.pieces)) if proto.pieces[i].type == NORMAL}
    used = {i for ids in encoded for i in ids}
    return {"size": len(proto.pieces), "unk_rate": unk / tokens, "unk": unk, "tokens_per_word": tokens / words,
            "unused_share": len(new - used) / len(new), "round_trip_fail": sum(
                sp.decode(ids) != line for ids, line in zip(encoded, lines, strict=True)) / len(lines)}


def main() -> int:
    default_base = Path(__file__).resolve().parents[1] / "tests" / "data" / "bpe.model"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=default_base)
    parser.add_argument("--size", type=int, default=24000)
    args = parser.parse_args()

    train, held_out = corpora(aspell_words())
    base_size = len(load_model_proto(args.base).pieces)
    print(f"corpus: {len(train)} sentences, {sum(len(s.split()) for s in train)} words; "
          f"held-out: {len(held_out)} sentences; base {args.base} ({base_size} pieces) -> {args.size}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fidel = Path(tmp) / "fidel.model"
        extend_tokenizer(args.base, train, fidel, args.size, lang_tag="AM")
        fidel_s = time.perf_counter() - start
        start = time.perf_counter()
        community = community_extension(args.base, train, Path(tmp) / "community.model", args.size)
        community_s = time.perf_counter() - start

        header = f"{'tokenizer':<10} {'corpus':<9} {'size':>6} {'<unk> rate':>10} {'<unk>':>6} {'tok/word':>8} " \
                 f"{'unused new':>10} {'rt fail':>8}"
        print(header)
        print("-" * len(header))
        for name, path in (("fidel", fidel), ("community", community)):
            for corpus_name, texts in (("train", train), ("held-out", held_out)):
                m = measure(path, base_size, texts)
                print(f"{name:<10} {corpus_name:<9} {m['size']:>6} {m['unk_rate']:>10.2%} {m['unk']:>6} "
                      f"{m['tokens_per_word']:>8.2f} {m['unused_share']:>10.1%} {m['round_trip_fail']:>8.1%}")
        print(f"build time: fidel {fidel_s:.1f} s, community {community_s:.1f} s")
        for name, path in (("fidel", fidel), ("community", community)):
            report = verify_tokenizer(path, args.base, train)
            print(f"verify {name}: {'PASS' if report.passed else 'FAIL ' + ', '.join(report.failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
