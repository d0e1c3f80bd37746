"""The one text normaliser: tokenizer build, data checks and training all call normalize_text.

The official base tokenizer knows upper-case Latin, CJK and the marks `! ' , - . ?` only. It has no digit
pieces and no Ethiopic punctuation, so everything else is mapped onto what it knows before encoding.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

ETHIOPIC_RANGES: tuple[tuple[int, int], ...] = (
    (0x1200, 0x139F),  # Ethiopic + Ethiopic Supplement
    (0x2D80, 0x2DDF),  # Ethiopic Extended
    (0xAB00, 0xAB2F),  # Ethiopic Extended-A
)
SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {"ethiopic": ETHIOPIC_RANGES}

# ፤ (semicolon) becomes "," not ".": it joins clauses inside one sentence, so the shorter pause is the
# better prosody and sentence splitting on "." stays right. ፡ is the old word separator: a space.
PUNCTUATION_MAP: dict[str, str] = {
    "።": ".", "፣": ",", "፤": ",", "፥": ",", "፦": ",", "፡": " ", "፧": "?", "፨": ".", "፠": ".",
    # the few non-Ethiopic marks upstream IndexTTS also rewrites (the base has no piece for them)
    ";": ",", ":": ",", "。": ".", "、": ",", "…": ".", "¡": "!", "¿": "?",
    '"': "'", "“": "'", "”": "'", "‘": "'", "’": "'", "«": "'", "»": "'",
    "(": "'", ")": "'", "[": "'", "]": "'",
}
PUNCTUATION_TABLE = str.maketrans(PUNCTUATION_MAP)

UNITS = ["ዜሮ", "አንድ", "ሁለት", "ሶስት", "አራት", "አምስት", "ስድስት", "ሰባት", "ስምንት", "ዘጠኝ"]
TENS = ["", "አስር", "ሃያ", "ሰላሳ", "አርባ", "ሃምሳ", "ስልሳ", "ሰባ", "ሰማንያ", "ዘጠና"]
TEN_COMBINING = "አስራ"  # 11..19 read "አስራ አንድ", not "አስር አንድ"
HUNDRED, THOUSAND, MILLION, POINT = "መቶ", "ሺህ", "ሚሊዮን", "ነጥብ"

ETHIOPIC_NUMERAL_RUN = re.compile("[\u1369-\u137c]+")
ASCII_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?")
WHITESPACE = re.compile(r"\s+")
SPACE_BEFORE_MARK = re.compile(r" ([.,!?])")


def ethiopic_numeral_value(numeral: str) -> int:
    """Value of a run of Ethiopic numerals, e.g. ፲፱፻፹፭ = 19*100 + 85 = 1985 and ፻፼ = 100*10000.

    ፻ and ፼ multiply what stands before them (Horner style), so ፼፼ = 10^8 and ፩፼፳፫፻፵፭ = 12345.
    """
    total, group, sub = 0, 0, 0  # total: whole myriads so far; group: hundreds in this myriad; sub: < 100
    for ch in numeral:
        value = int(unicodedata.numeric(ch))
        if value == 100:
            group = (group + (sub or (0 if group else 1))) * 100
            sub = 0
        elif value == 10000:
            below = group + sub
            total = (total + (below or (0 if total else 1))) * 10000
            group, sub = 0, 0
        else:
            sub += value
    return total + group + sub


def spell_number(n: int) -> str:
    """Amharic number words for a non-negative integer, e.g. 1985 -> "አንድ ሺህ ዘጠኝ መቶ ሰማንያ አምስት"."""
    if n < 0:
        raise ValueError(f"spell_number needs n >= 0, got {n}")
    if n < 10:
        return UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        if unit == 0:
            return TENS[tens]
        return f"{TEN_COMBINING if tens == 1 else TENS[tens]} {UNITS[unit]}"
    for scale, word in ((10**6, MILLION), (1000, THOUSAND), (100, HUNDRED)):
        if n >= scale:
            head, rest = divmod(n, scale)
            words = word if (scale == 100 and head == 1) else f"{spell_number(head)} {word}"
            return words if rest == 0 else f"{words} {spell_number(rest)}"
    raise AssertionError("unreachable")


def spell_ascii_number(match: re.Match) -> str:
    number = match.group(0).replace(",", "")
    whole, _, fraction = number.partition(".")
    words = spell_number(int(whole))
    if fraction:  # digits after the point are read one by one
        words += f" {POINT} " + " ".join(UNITS[int(d)] for d in fraction)
    return f" {words} "


def normalize_text(text: str) -> str:
    """NFC, Ethiopic numerals and digits spelled out in Amharic, Ge'ez punctuation mapped, upper-cased, one
    space between words, none before . , ! ?. Idempotent: normalize_text(normalize_text(x)) == normalize_text(x)."""
    text = unicodedata.normalize("NFC", text)
    text = ETHIOPIC_NUMERAL_RUN.sub(lambda m: f" {spell_number(ethiopic_numeral_value(m.group(0)))} ", text)
    text = ASCII_NUMBER.sub(spell_ascii_number, text)
    text = text.translate(PUNCTUATION_TABLE)
    text = text.upper()  # upstream IndexTTS upper-cases everything; the base has no lower-case pieces
    text = WHITESPACE.sub(" ", text).strip()
    return SPACE_BEFORE_MARK.sub(r"\1", text)  # spelled numbers must not leave "ሰባት ." behind


def in_ranges(ch: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in ranges)


def is_script_char(ch: str, script: str = "ethiopic") -> bool:
    return in_ranges(ch, SCRIPT_RANGES[script])


def script_share(text: str, script: str = "ethiopic") -> float:
    """Share of the letters in text that belong to script (0.0 when text has no letters)."""
    ranges = SCRIPT_RANGES[script]
    letters = {ch: n for ch, n in Counter(text).items() if ch.isalpha()}  # per distinct char: corpora are big
    total = sum(letters.values())
    if not total:
        return 0.0
    return sum(n for ch, n in letters.items() if in_ranges(ch, ranges)) / total


class FidelTextTokenizer:
    """IndexTTS2's TextTokenizer with fidel's normalize_text in front, so inference gets the ids training used.

    Upstream's own front end (TextNormalizer + TextTokenizer) turns `።` into `<unk>`, leaves Ethiopic numerals as
    they are and reads "12" as Chinese. Put this one in its place after loading IndexTTS2:

        from indextts.infer_v2 import IndexTTS2
        from fidel_tts.trainer.text.normalize import FidelTextTokenizer

        tts = IndexTTS2(model_dir="checkpoints")  # the release folder, fidel's exported three files in place
        tts.tokenizer = FidelTextTokenizer(tts.bpe_path)

    tokenize/encode/batch_encode normalise first; everything else (split_segments, convert_tokens_to_ids,
    unk_token_id, ...) is upstream's. normalizer: an upstream TextNormalizer to run after fidel's (what infer_v2
    would run); None, the default, gives exactly the training encoding. Needs `indextts2-inference` (imported
    here only when constructed).
    """

    def __init__(self, bpe_path, normalizer=None):
        from indextts.utils.front import TextTokenizer

        self.upstream = TextTokenizer(str(bpe_path), normalizer)

    def encode(self, text: str, **kwargs):
        return self.upstream.encode(normalize_text(text), **kwargs)

    def tokenize(self, text: str) -> list[str]:
        return self.encode(text, out_type=str)

    def batch_encode(self, texts: list[str], **kwargs):
        return self.upstream.batch_encode([normalize_text(t) for t in texts], **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.upstream, name)
