"""The one text normaliser: tokenizer build, data checks and training all call normalize_text.

The official base tokenizer knows upper-case Latin, CJK and the marks `! ' , - . ?` only. It has no digit
pieces, no Ethiopic punctuation and no byte fallback, so every other character a corpus can hold is mapped
onto what it knows (punctuation), spelled out in Amharic words (numbers, %, &, +, @, $ ...) or, for Ethiopic
letters, added to the tokenizer as pieces (tokenizer.py adds the whole block).

The rules change training ids, so they carry a version: NORMALIZER_VERSION goes up whenever any rule's
output changes, and the tokenizer record stores it with the options (normalizer_record).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

from fidel_tts.trainer.errors import FidelError

NORMALIZER_VERSION = 2

# The one place that says which Unicode ranges a script uses: coverage checks and the letters the extension
# adds both read it. Letters are what unicodedata calls Lo in these ranges (numerals and marks are not).
ETHIOPIC_RANGES: tuple[tuple[int, int], ...] = (
    (0x1200, 0x139F),  # Ethiopic + Ethiopic Supplement (labialised forms included)
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
    '"': "'", "“": "'", "”": "'", "‘": "'", "’": "'", "«": "'", "»": "'", "‹": "'", "›": "'",
    "(": "'", ")": "'", "[": "'", "]": "'", "{": "'", "}": "'",
    # dashes and bullets are pauses; markup and layout characters carry no sound
    "–": ",", "—": ",", "―": ",", "•": ",", "·": ",", "*": " ", "_": " ", "|": " ", "~": " ", "^": " ",
    "`": "'", "\\": " ", "/": " ", "<": " ", ">": " ", "=": " ", "′": "'", "″": "'",
}
PUNCTUATION_TABLE = str.maketrans(PUNCTUATION_MAP)

# Symbols that are words when read aloud (spelled, surrounded by spaces). Arithmetic signs are spelled
# only between numbers (ARITHMETIC); elsewhere they are markup and PUNCTUATION_MAP drops them.
SYMBOL_WORDS: dict[str, str] = {"&": "እና", "@": "አት", "#": "ቁጥር", "°": "ዲግሪ", "$": "ዶላር", "€": "ዩሮ",
                                "£": "ፓውንድ", "%": "በመቶ", "‰": "በሺህ", "+": "ፕላስ", "×": "ጊዜ", "÷": "ሲካፈል"}
ARITHMETIC_WORDS: dict[str, str] = {"+": "ሲደመር", "*": "ጊዜ", "×": "ጊዜ", "/": "ሲካፈል",
                                    "÷": "ሲካፈል", "=": "እኩል", "<": "ያንሳል ከ", ">": "ይበልጣል ከ"}

UNITS = ["ዜሮ", "አንድ", "ሁለት", "ሶስት", "አራት", "አምስት", "ስድስት", "ሰባት", "ስምንት", "ዘጠኝ"]
TENS = ["", "አስር", "ሃያ", "ሰላሳ", "አርባ", "ሃምሳ", "ስልሳ", "ሰባ", "ሰማንያ", "ዘጠና"]
TEN_COMBINING = "አስራ"  # 11..19 read "አስራ አንድ", not "አስር አንድ"
HUNDRED, THOUSAND, POINT, MINUS, RANGE_TO = "መቶ", "ሺህ", "ነጥብ", "ሲቀነስ", "እስከ"
SCALES = ((10**12, "ትሪሊዮን"), (10**9, "ቢሊዮን"), (10**6, "ሚሊዮን"), (1000, THOUSAND), (100, HUNDRED))
ORDINAL_STEMS = {THOUSAND: "ሺ", "ዘጠኝ": "ዘጠነ"}  # the two whose last letter does not just drop to first order
HOUR, MINUTE, MINUTE_JOIN = "ሰዓት", "ደቂቃ", "ከ"

# Abbreviations written with / or . (a short table of the common ones; an unknown one-letter X/Y is read
# as its two parts). Longest first so ዓ.ም. wins over ዓ.ም.
ABBREVIATIONS: dict[str, str] = {
    "ዓ.ም.": "ዓመተ ምሕረት", "ዓ.ም": "ዓመተ ምሕረት", "ዓ/ም": "ዓመተ ምሕረት", "ዓ.ዓ.": "ዓመተ ዓለም", "ዓ.ዓ": "ዓመተ ዓለም",
    "ዶ/ር": "ዶክተር", "ወ/ሮ": "ወይዘሮ", "ወ/ሪት": "ወይዘሪት", "ወ/ት": "ወይዘሪት", "ት/ቤት": "ትምህርት ቤት",
    "ጠ/ሚ": "ጠቅላይ ሚኒስትር", "ጠ/ሚኒስትር": "ጠቅላይ ሚኒስትር", "ፕ/ር": "ፕሮፌሰር", "ቤ/ክ": "ቤተ ክርስቲያን",
    "ቤ/ክርስቲያን": "ቤተ ክርስቲያን", "ፍ/ቤት": "ፍርድ ቤት", "ም/ቤት": "ምክር ቤት", "መ/ቤት": "መሥሪያ ቤት",
    "ሆ/ል": "ሆስፒታል", "ክ/ከተማ": "ክፍለ ከተማ", "ክ/ሀገር": "ክፍለ ሀገር", "ሚ/ር": "ሚኒስቴር", "ም/ል": "ምክትል",
    "አ/አ": "አዲስ አበባ", "ኢ/ር": "ኢንጂነር", "ሻ/ል": "ሻምበል", "ኮ/ል": "ኮሎኔል", "ጄ/ል": "ጄኔራል",
    "ገ/": "ገብረ ", "ወ/": "ወልደ ", "ኃ/": "ኃይለ ", "ተ/": "ተክለ ",
}
ETHIOPIC_LETTER = "\u1200-\u135a\u2d80-\u2ddf\uab00-\uab2f"
ABBREVIATION = re.compile(f"(?<![{ETHIOPIC_LETTER}])(" + "|".join(
    re.escape(a) for a in sorted(ABBREVIATIONS, key=len, reverse=True)) + ")")
WORD_SLASH_WORD = re.compile(f"(?<=[{ETHIOPIC_LETTER}]{{2}})/(?=[{ETHIOPIC_LETTER}]{{2}})")  # ወንድ/ሴት
OR = "ወይም"

# Same-sound letters (option fold_same_sound): whole rows ሐ, ኀ -> ሀ; ሠ -> ሰ; ዐ -> አ; ፀ -> ጸ, seven orders
# each (labialised forms keep their own letters). Off by default: it changes spelling.
FOLD_ROWS = ((0x1210, 0x1200), (0x1280, 0x1200), (0x1220, 0x1230), (0x12D0, 0x12A0), (0x1340, 0x1338))
FOLD_TABLE = {src + k: dst + k for src, dst in FOLD_ROWS for k in range(7)}

ETHIOPIC_NUMERAL_RUN = re.compile("([\u1369-\u137c]+)(\\s?ኛ)?")
DOUBLE_WORDSPACE = re.compile("፡\\s*፡")  # ፡፡ is written for ። (a full stop)
NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?"
ORDINAL = re.compile(r"(\d+)\s?ኛ")
PERCENT = re.compile(rf"({NUMBER})\s?([%‰])")
CURRENCY_BEFORE = re.compile(rf"([$€£])\s?({NUMBER})")
TIME = re.compile(r"(?<![\d:])(\d{1,2}):(\d{2})(?![\d:])")
DATE = re.compile(r"(?<![\d/])(\d{1,2})[/.](\d{1,2})[/.](\d{4}|\d{2})(?![\d/])")
PHONE = re.compile(r"(?<![\d+])(\+\d{3}|0)[ -]?(\d{2,3})[ -]?(\d{3})[ -]?(\d{3,4})(?!\d)")
RANGE = re.compile(rf"(?<![\d.,])({NUMBER})\s?[-–—]\s?({NUMBER})(?![\d])")
NEGATIVE = re.compile(rf"(?<![\w.,])-({NUMBER})")
ARITHMETIC = re.compile(rf"({NUMBER})\s?([+*×/÷=<>])\s?(?=\d)")
ASCII_NUMBER = re.compile(NUMBER)
WHITESPACE = re.compile(r"\s+")
SPACE_BEFORE_MARK = re.compile(r" ([.,!?])")
REPEATED_MARK = re.compile(r"([.,!?])(?:\s*[.,])+")


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
    for scale, word in SCALES:
        if n >= scale and (n < scale * 1000 or scale == SCALES[0][0]):
            head, rest = divmod(n, scale)
            words = word if (scale == 100 and head == 1) else f"{spell_number(head)} {word}"
            return words if rest == 0 else f"{words} {spell_number(rest)}"
    raise AssertionError("unreachable")


def ordinal_word(n: int) -> str:
    """8 -> ስምንተኛ, 1 -> አንደኛ, 20 -> ሃያኛ, 1000 -> አንድ ሺኛ: the last word's closing sixth-order letter
    becomes its first order, then ኛ."""
    head, _, last = spell_number(n).rpartition(" ")
    if last in ORDINAL_STEMS:
        last = ORDINAL_STEMS[last]
    elif (ord(last[-1]) - 0x1200) % 8 == 5:  # sixth order (ድ ት ኝ ር ን ...) -> first order (ደ ተ ነ ረ ነ)
        last = last[:-1] + chr(ord(last[-1]) - 5)
    return f"{head} {last}ኛ".strip()


def spell_decimal(number: str) -> str:
    whole, _, fraction = number.replace(",", "").partition(".")
    words = spell_number(int(whole))
    if fraction:  # digits after the point are read one by one
        words += f" {POINT} " + " ".join(UNITS[int(d)] for d in fraction)
    return words


def spell_digits(digits: str) -> str:
    return " ".join(UNITS[int(d)] for d in digits if d.isdigit())


def read_phone(match: re.Match) -> str:
    """0911 23 45 67 style numbers: each group digit by digit, groups split by a pause."""
    prefix, *groups = match.groups()
    lead = f"ፕላስ {spell_digits(prefix)}" if prefix.startswith("+") else UNITS[0]
    return " " + ", ".join([f"{lead} {spell_digits(groups[0])}"] + [spell_digits(g) for g in groups[1:]]) + " "


def read_time(match: re.Match) -> str:
    hours, minutes = int(match.group(1)), int(match.group(2))
    if hours > 24 or minutes > 59:
        return f" {spell_number(hours)}, {spell_number(minutes)} "  # a ratio or score, not a clock time
    words = f"{spell_number(hours)} {HOUR}"
    return f" {words} {MINUTE_JOIN} {spell_number(minutes)} {MINUTE} " if minutes else f" {words} "


def read_date(match: re.Match) -> str:
    """12/05/2016 -> day, month, year as cardinals with a pause between: whether the date is Ethiopian or
    Gregorian cannot be told from the digits, so no month name is guessed."""
    return " " + ", ".join(spell_number(int(g)) for g in match.groups()) + " "


def read_ethiopic_numeral(match: re.Match) -> str:
    value = ethiopic_numeral_value(match.group(1))
    return f" {ordinal_word(value)}" if match.group(2) else f" {spell_number(value)} "


def fold_same_sound(text: str) -> str:
    return "".join(chr(FOLD_TABLE.get(ord(ch), ord(ch))) for ch in text)


def expand_abbreviation(match: re.Match) -> str:
    abbreviation = match.group(1)
    ends_text = abbreviation.endswith(".") and not match.string[match.end():].strip()
    return f" {ABBREVIATIONS[abbreviation]}{'.' if ends_text else ''} "  # its dot was also the full stop


def spell_symbols(text: str) -> str:
    for symbol, word in SYMBOL_WORDS.items():
        if symbol in text:
            text = text.replace(symbol, f" {word} ")
    return text


def spell_numbers(text: str) -> str:
    """Every digit becomes words; the order matters: phones, dates and times before plain numbers."""
    text = PHONE.sub(read_phone, text)
    text = DATE.sub(read_date, text)
    text = TIME.sub(read_time, text)
    text = ORDINAL.sub(lambda m: f" {ordinal_word(int(m.group(1)))}", text)
    text = RANGE.sub(lambda m: f" {spell_decimal(m.group(1))} {RANGE_TO} {spell_decimal(m.group(2))} ", text)
    text = PERCENT.sub(lambda m: f" {spell_decimal(m.group(1))} {SYMBOL_WORDS[m.group(2)]} ", text)
    text = CURRENCY_BEFORE.sub(lambda m: f" {spell_decimal(m.group(2))} {SYMBOL_WORDS[m.group(1)]} ", text)
    text = NEGATIVE.sub(lambda m: f" {MINUS} {spell_decimal(m.group(1))} ", text)
    text = ARITHMETIC.sub(lambda m: f" {spell_decimal(m.group(1))} {ARITHMETIC_WORDS[m.group(2)]} ", text)
    return ASCII_NUMBER.sub(lambda m: f" {spell_decimal(m.group(0))} ", text)


def normalize_text(text: str, fold: bool = False) -> str:
    """NFC; Ethiopic numerals, digits and symbols read out in Amharic words; abbreviations expanded; Ge'ez
    punctuation mapped; upper-cased; one space between words, none before . , ! ?. fold: same-sound letter
    folding (ሐ ኀ -> ሀ, ሠ -> ሰ, ዐ -> አ, ፀ -> ጸ). Idempotent."""
    text = unicodedata.normalize("NFC", text)
    if fold:
        text = fold_same_sound(text)
    text = ETHIOPIC_NUMERAL_RUN.sub(read_ethiopic_numeral, text)
    text = DOUBLE_WORDSPACE.sub("።", text)
    text = ABBREVIATION.sub(expand_abbreviation, text)
    text = WORD_SLASH_WORD.sub(f" {OR} ", text)
    text = spell_numbers(text)
    text = spell_symbols(text)
    text = text.translate(PUNCTUATION_TABLE)
    text = text.upper()  # upstream IndexTTS upper-cases everything; the base has no lower-case pieces
    text = WHITESPACE.sub(" ", text).strip()
    text = SPACE_BEFORE_MARK.sub(r"\1", text)  # spelled numbers must not leave "ሰባት ." behind
    return REPEATED_MARK.sub(r"\1", text)


def normalizer_record(fold: bool = False) -> dict:
    """What a tokenizer record stores so that the same normalisation is applied later."""
    return {"version": NORMALIZER_VERSION, "fold_same_sound": fold}


def in_ranges(ch: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in ranges)


def script_letters(script: str = "ethiopic") -> str:
    """Every letter (Unicode category Lo) in the script's ranges: the pieces an extension always adds."""
    return "".join(chr(code) for lo, hi in SCRIPT_RANGES[script] for code in range(lo, hi + 1)
                   if unicodedata.category(chr(code)) == "Lo")


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


def check_normalizer_record(recorded: dict | None, where) -> bool:
    """The fold option of a stored normaliser record; FidelError when it was made by other rules. A record
    without one predates versioning (version 1)."""
    recorded = recorded or {"version": 1, "fold_same_sound": False}
    if recorded.get("version") != NORMALIZER_VERSION:
        raise FidelError(where, f"made with text normaliser version {recorded.get('version')}, this fidel has "
                                f"version {NORMALIZER_VERSION}; rebuild the tokenizer with this fidel")
    return bool(recorded.get("fold_same_sound"))


def recorded_fold(model_path) -> bool:
    """The normaliser options in the .json record beside a tokenizer model, checked against this version;
    a model with no record (the official base) gets the defaults."""
    record_path = Path(model_path).with_suffix(".json")
    if not record_path.is_file():
        return False
    return check_normalizer_record(json.loads(record_path.read_text(encoding="utf-8")).get("normalizer"),
                                   record_path)


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

        self.fold = recorded_fold(bpe_path)
        self.upstream = TextTokenizer(str(bpe_path), normalizer)

    def normalize(self, text: str) -> str:
        return normalize_text(text, fold=self.fold)

    def encode(self, text: str, **kwargs):
        return self.upstream.encode(self.normalize(text), **kwargs)

    def tokenize(self, text: str) -> list[str]:
        return self.encode(text, out_type=str)

    def batch_encode(self, texts: list[str], **kwargs):
        return self.upstream.batch_encode([self.normalize(t) for t in texts], **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.upstream, name)
