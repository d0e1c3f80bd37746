import unicodedata

import pytest
from fidel_tts.trainer.text.normalize import (
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
    (2_500_000, "ሁለት ሚሊዮን አምስት መቶ ሺህ"), (1_000_000_000, "አንድ ቢሊዮን"), (2_000_000_000_000, "ሁለት ትሪሊዮን"),
    (1_500_000_000, "አንድ ቢሊዮን አምስት መቶ ሚሊዮን"),
])
def test_spell_number(n, words):
    assert spell_number(n) == words


def test_numerals_and_digits_are_spelled_out_as_separate_words():
    assert normalize_text("በ፲፱፻፹፭ ዓ.ም") == "በ አንድ ሺህ ዘጠኝ መቶ ሰማንያ አምስት ዓመተ ምሕረት"
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


def test_fidel_text_normalize_prints_the_training_text_for_arguments_or_stdin(capsys, monkeypatch):
    import io

    from fidel_tts.flows.cli import main as fidel

    assert fidel(["text", "normalize", "ሰላም", "ነው።", "፲፱፻፹፭"]) == 0
    assert capsys.readouterr().out == "ሰላም ነው. አንድ ሺህ ዘጠኝ መቶ ሰማንያ አምስት\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("12 ሰዎች፣ መጡ፤\nእሱ 3.5 ኪሎ ገዛ፧\n"))
    assert fidel(["text", "normalize"]) == 0
    assert capsys.readouterr().out == "አስራ ሁለት ሰዎች, መጡ,\nእሱ ሶስት ነጥብ አምስት ኪሎ ገዛ?\n"


@pytest.fixture(scope="module")
def amharic_sample():
    """Sentences as the demo corpus writes them (Ge'ez punctuation, Ethiopic and ASCII numerals), from the in-repo
    word list; every one with a numeral, most with ፣ or ፤ as well."""
    import random

    from fidel_tts.flows.demo.corpus import _amharic_sentence

    from tests.fixtures.synthetic import AMHARIC_WORDS

    rng = random.Random(0)
    out = []
    while len(out) < 200:
        sentence = _amharic_sentence(AMHARIC_WORDS, rng)
        if any(ch.isdigit() or "\u1369" <= ch <= "\u137c" for ch in sentence):
            out.append(sentence)
    return out


@pytest.mark.slow  # upstream's TextNormalizer compiles its NeMo grammars: ~8 s from its cache, ~40 s the first time
def test_fidel_normalisation_through_upstreams_front_end_gives_the_training_ids(amharic_sample, tmp_path):
    pytest.importorskip("indextts.utils.front")
    import random

    from fidel_tts.flows.demo.corpus import _english_sentence
    from fidel_tts.trainer.text.normalize import FidelTextTokenizer
    from fidel_tts.trainer.text.tokenizer import (
        encode,
        extend_tokenizer,
        load_tokenizer,
        train_base_tokenizer,
    )
    from indextts.utils.front import TextNormalizer, TextTokenizer

    from tests.fixtures.synthetic import ENGLISH_WORDS

    # a base that knows , . ? ! as the official one does, extended on the sample: no <unk> in the training ids
    rng = random.Random(1)
    english = [_english_sentence(tuple(ENGLISH_WORDS), rng) for _ in range(300)]
    base = train_base_tokenizer(english, tmp_path / "base.model", vocab_size=100)
    path = tmp_path / "bpe.model"
    extend_tokenizer(base, amharic_sample, path, "max")
    sp = load_tokenizer(path)
    training = [encode(sp, s) for s in amharic_sample]
    upstream_normalizer = TextNormalizer(enable_glossary=True)  # as infer_v2 builds it
    raw = TextTokenizer(str(path), upstream_normalizer)  # IndexTTS2's own front end
    fronts = {
        "upstream front end alone": raw,
        "FidelTextTokenizer": FidelTextTokenizer(path),
        "FidelTextTokenizer + upstream TextNormalizer": FidelTextTokenizer(path, upstream_normalizer),
    }
    mismatches = {name: sum(front.encode(s) != ids for s, ids in zip(amharic_sample, training, strict=True))
                  for name, front in fronts.items()}
    marks = sum(any(m in s for m in "።፣፤፧") for s in amharic_sample)
    unknown = sum(ids.count(sp.unk_id()) for ids in training)
    print(f"\n[front end] {len(amharic_sample)} Amharic sentences, all with numerals, {marks} with Ge'ez marks, "
          f"{unknown} <unk> in the training ids; "
          "sentences whose ids differ from training: " + ", ".join(f"{k} {v}" for k, v in mismatches.items()))
    assert unknown == 0 and mismatches["FidelTextTokenizer"] == 0
    assert mismatches["FidelTextTokenizer + upstream TextNormalizer"] == 0
    assert mismatches["upstream front end alone"] > 0
    fidel_tokens = fronts["FidelTextTokenizer"]
    assert fidel_tokens.tokenize(amharic_sample[0]) == sp.encode(normalize_text(amharic_sample[0]), out_type=str)
    assert fidel_tokens.unk_token_id == sp.unk_id()  # the rest is upstream's
