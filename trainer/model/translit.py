"""Ethiopic → Latin transliteration, for the `subtoken` init of new text rows.

A new Amharic piece such as "▁ሰላም" is read as "▁SELAM"; the base tokenizer (upper-case Latin) encodes that
into base pieces, and the new row starts from their mean. The table is the syllabary's regular layout: each
consonant series holds 8 code points (vowel orders 1 to 7, then the labialised "wa"), so one onset per
series and one vowel per order spell every syllable. Upper case, because upstream upper-cases all text.
"""

from __future__ import annotations

import hashlib
import json

# First code point of each series → Latin onset. Laryngeals and the glottal stop spell as their vowel.
SERIES_ONSETS: dict[int, str] = {
    0x1200: "H", 0x1208: "L", 0x1210: "H", 0x1218: "M", 0x1220: "S", 0x1228: "R", 0x1230: "S", 0x1238: "SH",
    0x1240: "Q", 0x1248: "QW", 0x1260: "B", 0x1268: "V", 0x1270: "T", 0x1278: "CH", 0x1280: "H", 0x1288: "HW",
    0x1290: "N", 0x1298: "NY", 0x12A0: "", 0x12A8: "K", 0x12B0: "KW", 0x12B8: "H", 0x12C8: "W", 0x12D0: "",
    0x12D8: "Z", 0x12E0: "ZH", 0x12E8: "Y", 0x12F0: "D", 0x1300: "J", 0x1308: "G", 0x1310: "GW", 0x1320: "T",
    0x1328: "CH", 0x1330: "P", 0x1338: "TS", 0x1340: "TS", 0x1348: "F", 0x1350: "P",
}
# Vowel orders 1..7 and the 8th (labialised) form. The 6th order is mostly vowel-less in Amharic spelling.
ORDER_VOWELS: tuple[str, ...] = ("E", "U", "I", "A", "E", "", "O", "WA")
# After a laryngeal (ሀ ሐ ኀ) or glottal (አ ዐ) the 1st order is pronounced "a" in Amharic.
FIRST_ORDER_A: frozenset[int] = frozenset({0x1200, 0x1210, 0x1280, 0x12A0, 0x12D0})
# The labialised series (ቈ ኈ ኰ ጐ) use orders 1, 3, 4, 5, 6 only; their vowels follow the "w" onset.
LABIALISED: frozenset[int] = frozenset({0x1248, 0x1288, 0x12B0, 0x1310})

WORD_START = "▁"  # sentencepiece's word-boundary mark


def syllable(ch: str) -> str | None:
    """Latin spelling of one Ethiopic syllable, or None when the table does not cover it."""
    code = ord(ch)
    series, order = code & ~7, code & 7
    if series not in SERIES_ONSETS:
        return None
    if series in LABIALISED and order not in (0, 2, 3, 4, 5):
        return None
    vowel = "A" if (order == 0 and series in FIRST_ORDER_A) else ORDER_VOWELS[order]
    return SERIES_ONSETS[series] + vowel


def is_ethiopic(ch: str) -> bool:
    return 0x1200 <= ord(ch) <= 0x139F


def transliterate(text: str) -> str | None:
    """Latin reading of text: Ethiopic syllables spelled, everything else kept. None if a syllable is unknown."""
    out = []
    for ch in text:
        if is_ethiopic(ch):
            latin = syllable(ch)
            if latin is None:
                return None
            out.append(latin)
        else:
            out.append(ch)
    return "".join(out)


def table_sha256() -> str:
    """Identifies the table in the init record, so a changed table is a different init."""
    data = json.dumps([sorted(SERIES_ONSETS.items()), ORDER_VOWELS, sorted(FIRST_ORDER_A), sorted(LABIALISED)])
    return hashlib.sha256(data.encode()).hexdigest()
