import unicodedata

import pytest

from trainer.text import (
    ETHIOPIC_RANGES,
    ethiopic_numeral_value,
    normalize_text,
    script_share,
    spell_number,
)


@pytest.mark.parametrize("raw, expected", [
    ("ሰላም።", "ሰላም."),
    ("አንድ፣ ሁለት", "አንድ, ሁለት"),
    ("አንድ፤ ሁለት", "አንድ, ሁለት"),
    ("ቃል፥ ቃል፦ ቃል", "ቃል, ቃል, ቃል"),
    ("ሰላም፡ዓለም", "ሰላም ዓለም"),
    ("እንዴት ነህ፧", "እንዴት ነህ?"),
    ("መጨረሻ፨", "መጨረሻ."),
    ("«ሰላም»", "'ሰላም'"),
])
def test_geez_punctuation_maps_to_marks_the_base_knows(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("numeral, value", [
    ("፩", 1), ("፱", 9), ("፲", 10), ("፲፩", 11), ("፺፱", 99),
    ("፻", 100), ("፪፻", 200), ("፻፩", 101), ("፲፱፻፹፭", 1985), ("፳፻፲፭", 2015),
    ("፼", 10000), ("፭፼", 50000), ("፻፼", 1_000_000), ("፪፻፼", 2_000_000), ("፼፼", 100_000_000),
    ("፩፼፳፫፻፵፭", 12345),
])
def test_ethiopic_numeral_values_including_hundred_and_myriad_forms(numeral, value):
    assert ethiopic_numeral_value(numeral) == value


@pytest.mark.parametrize("n, words", [
    (0, "ዜሮ"), (7, "ሰባት"), (10, "አስር"), (11, "አስራ አንድ"), (19, "አስራ ዘጠኝ"), (20, "ሃያ"), (21, "ሃያ አንድ"),
    (90, "ዘጠና"), (100, "መቶ"), (101, "መቶ አንድ"), (250, "ሁለት መቶ ሃምሳ"), (1000, "አንድ ሺህ"),
    (1985, "አንድ ሺህ ዘጠኝ መቶ ሰማንያ አምስት"), (10000, "አስር ሺህ"), (100000, "መቶ ሺህ"),
    (2_500_000, "ሁለት ሚሊዮን አምስት መቶ ሺህ"), (1_000_000_000, "አንድ ሺህ ሚሊዮን"),
])
def test_spell_number(n, words):
    assert spell_number(n) == words


def test_numerals_and_digits_are_spelled_out_as_separate_words():
    assert normalize_text("በ፲፱፻፹፭ ዓ.ም") == "በ አንድ ሺህ ዘጠኝ መቶ ሰማንያ አምስት ዓ.ም"
    assert normalize_text("፻፼ ሰዎች") == "አንድ ሚሊዮን ሰዎች"
    assert normalize_text("በ2015።") == "በ ሁለት ሺህ አስራ አምስት."
    assert normalize_text("1,000,000") == "አንድ ሚሊዮን"
    assert normalize_text("3.5") == "ሶስት ነጥብ አምስት"
    assert not any(ch.isdigit() for ch in normalize_text("007 and ፳፫ and 42"))


def test_whitespace_is_collapsed_and_stripped():
    assert normalize_text("  ሰላም \t\n  ዓለም  ") == "ሰላም ዓለም"
    assert normalize_text(" \n\t ") == ""


def test_latin_is_upper_cased_and_ethiopic_is_untouched():
    assert normalize_text("Hello ሰላም world") == "HELLO ሰላም WORLD"


def test_nfc():
    decomposed = "Cafe\u0301"  # e + combining acute
    assert normalize_text(decomposed) == unicodedata.normalize("NFC", "CAFÉ")
    assert len(normalize_text(decomposed)) == 4


def test_idempotent():
    text = "  በ፲፱፻፹፭ ዓ.ም፣ hello 12 «ሰላም»፡ዓለም።  "
    once = normalize_text(text)
    assert normalize_text(once) == once


def test_script_share():
    assert script_share("ሰላም") == 1.0
    assert script_share("HELLO") == 0.0
    assert script_share("ሰላም HELLO") == pytest.approx(3 / 8)
    assert script_share("123 ., ?") == 0.0  # no letters at all
    assert script_share("ⶀ ꬁ") == 1.0  # Ethiopic Extended and Extended-A count too
    assert ETHIOPIC_RANGES[0] == (0x1200, 0x139F)
