"""Extension, verify, <unk> by character class and tokens per word on real Amharic text (issue 24's numbers).

Corpus: tests/data/amharic/amharic.txt (Debian translations, scripts/amharic_corpus.py); every fifth line
held out. Steps: extend to --size (24000 by default) and, when the corpus supports less, again with the size
the error names; verify on the held-out lines; count <unk> per Unicode character class in the held-out
lines for the official base and the extension; tokens per word for the base, the extension and the
extension built and read with same-sound folding.

Run: .venv/bin/python -m benchmarks.amharic_real_text [--size 24000]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import unicodedata
from collections import Counter
from pathlib import Path

from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.text.normalize import normalize_text
from fidel_tts.trainer.text.tokenizer import extend_tokenizer, load_tokenizer, verify_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS, BASE = ROOT / "tests/data/amharic/amharic.txt", ROOT / "tests/data/bpe.model"


def timed_extend(train: list[str], out: Path, size, fold: bool = False):
    start = time.perf_counter()
    try:
        record = extend_tokenizer(BASE, train, out, size, lang_tag="AM", fold=fold)
    except FidelError as e:
        return None, str(e), time.perf_counter() - start
    return record, "", time.perf_counter() - start


def unk_by_class(model: Path, lines: list[str], fold: bool = False) -> Counter:
    sp = load_tokenizer(model)
    counts = Counter()
    for ch, n in Counter("".join(sp.normalize(normalize_text(t, fold=fold)) for t in lines)).items():
        if sp.unk_id() in sp.encode(ch, out_type=int):
            counts[unicodedata.category(ch)] += n
    return counts


def tokens_per_word(model: Path, lines: list[str], fold: bool = False) -> float:
    sp = load_tokenizer(model)
    normalised = [normalize_text(t, fold=fold) for t in lines]
    return sum(len(sp.encode(t)) for t in normalised) / sum(len(t.split()) for t in normalised)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="24000")
    size = parser.parse_args().size
    size = size if size == "max" else int(size)
    lines = [t for t in CORPUS.read_text(encoding="utf-8").splitlines() if t.strip()]
    train, held_out = [t for i, t in enumerate(lines) if i % 5], [t for i, t in enumerate(lines) if not i % 5]
    with tempfile.TemporaryDirectory() as tmp:
        out, folded = Path(tmp) / "am.model", Path(tmp) / "fold.model"
        record, error, seconds = timed_extend(train, out, size)
        print(f"extend --size {size}: {'reached ' + str(record.target_size) if record else error} ({seconds:.1f} s)")
        if record is None:
            largest = int(re.search(r"at most size (\d+)", error).group(1))
            record, error, seconds = timed_extend(train, out, largest)
            print(f"extend --size {largest}: reached {record.target_size} ({seconds:.1f} s)")
        report = verify_tokenizer(out, BASE, held_out)
        print(f"verify on {len(held_out)} held-out lines:\n{report.to_text()}")
        timed_extend(train, folded, "max", fold=True)
        print(f"<unk> by class, held out: base {dict(unk_by_class(BASE, held_out))}, "
              f"extension {dict(unk_by_class(out, held_out))}")
        print(f"tokens per word, held out: base {tokens_per_word(BASE, held_out):.2f}, extension "
              f"{tokens_per_word(out, held_out):.2f}, extension with folding "
              f"{tokens_per_word(folded, held_out, fold=True):.2f}")


if __name__ == "__main__":
    main()
