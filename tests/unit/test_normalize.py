"""Normalisation of real and realistic Amharic sentences, one rule or more each (README: text normalisation)."""

from pathlib import Path

import pytest
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.text.normalize import (
    NORMALIZER_VERSION,
    check_normalizer_record,
    fold_same_sound,
    is_script_char,
    normalize_text,
    normalizer_record,
    ordinal_word,
    recorded_fold,
    script_letters,
)

REAL_TEXT = Path(__file__).resolve().parents[1] / "data" / "amharic" / "amharic.txt"

SENTENCES = [
    ('ልጁ 8ኛ ክፍል ተማሪ ነው።', 'ልጁ ስምንተኛ ክፍል ተማሪ ነው.'),
    ('አንደኛ: 1ኛው ሯጭ ወርቅ አገኘ።', 'አንደኛ, አንደኛው ሯጭ ወርቅ አገኘ.'),
    ('፫ኛው ቀን ደረሰ።', 'ሶስተኛው ቀን ደረሰ.'),
    ('በ2ኛ ደረጃ ት/ቤት ትማራለች።', 'በ ሁለተኛ ደረጃ ትምህርት ቤት ትማራለች.'),
    ('ከሰራተኞቹ 50% የሚሆኑት ሴቶች ናቸው።', 'ከሰራተኞቹ ሃምሳ በመቶ የሚሆኑት ሴቶች ናቸው.'),
    ('የዋጋ ግሽበቱ 12.5% ደርሷል።', 'የዋጋ ግሽበቱ አስራ ሁለት ነጥብ አምስት በመቶ ደርሷል.'),
    ('ስብሰባው 12/05/2016 ይካሄዳል።', 'ስብሰባው አስራ ሁለት, አምስት, ሁለት ሺህ አስራ ስድስት ይካሄዳል.'),
    ('የተወለደው 1.1.1990 ነው።', 'የተወለደው አንድ, አንድ, አንድ ሺህ ዘጠኝ መቶ ዘጠና ነው.'),
    ('ፕሮግራሙ ከጠዋቱ 3:30 ይጀምራል።', 'ፕሮግራሙ ከጠዋቱ ሶስት ሰዓት ከ ሰላሳ ደቂቃ ይጀምራል.'),
    ('ሰዓቱ 00:00 ሲሆን ዓመቱ ይቀየራል።', 'ሰዓቱ ዜሮ ሰዓት ሲሆን ዓመቱ ይቀየራል.'),
    ('በ10:05 ባቡሩ ይነሳል።', 'በ አስር ሰዓት ከ አምስት ደቂቃ ባቡሩ ይነሳል.'),
    ('ዋጋው 1,500.50 ብር ነው።', 'ዋጋው አንድ ሺህ አምስት መቶ ነጥብ አምስት ዜሮ ብር ነው.'),
    ('ህዝቡ 120,000,000 ደርሷል።', 'ህዝቡ መቶ ሃያ ሚሊዮን ደርሷል.'),
    ('ለበለጠ መረጃ 0911234567 ይደውሉ።', 'ለበለጠ መረጃ ዜሮ ዘጠኝ አንድ አንድ, ሁለት ሶስት አራት, አምስት ስድስት ሰባት ይደውሉ.'),
    ('ስልክ፦ +251 911 234 567', 'ስልክ, ፕላስ ሁለት አምስት አንድ ዘጠኝ አንድ አንድ, ሁለት ሶስት አራት, አምስት ስድስት ሰባት'),
    ('በ 011-551-2345 ይደውሉ።', 'በ ዜሮ አንድ አንድ, አምስት አምስት አንድ, ሁለት ሶስት አራት አምስት ይደውሉ.'),
    ('በጀቱ 1000000000 ብር ነው።', 'በጀቱ አንድ ቢሊዮን ብር ነው.'),
    ('ዕዳው 2,000,000,000,000 ብር ይገመታል።', 'ዕዳው ሁለት ትሪሊዮን ብር ይገመታል.'),
    ('ሰላም፡፡ እንዴት ነህ፡፡', 'ሰላም. እንዴት ነህ.'),
    ('ሰላም፡ዓለም።', 'ሰላም ዓለም.'),
    ('በ2015 ዓ.ም. ተመሰረተ።', 'በ ሁለት ሺህ አስራ አምስት ዓመተ ምሕረት ተመሰረተ.'),
    ('በ፲፱፻፹፭ ዓ.ም ተወለደ።', 'በ አንድ ሺህ ዘጠኝ መቶ ሰማንያ አምስት ዓመተ ምሕረት ተወለደ.'),
    ('ዶ/ር አበበ በሽተኛውን አዩ።', 'ዶክተር አበበ በሽተኛውን አዩ.'),
    ('ወ/ሮ አልማዝ እና ወ/ት ሰናይት መጡ።', 'ወይዘሮ አልማዝ እና ወይዘሪት ሰናይት መጡ.'),
    ('ጠ/ሚ ዐቢይ ንግግር አደረጉ።', 'ጠቅላይ ሚኒስትር ዐቢይ ንግግር አደረጉ.'),
    ('ፍ/ቤት ውሳኔ ሰጠ።', 'ፍርድ ቤት ውሳኔ ሰጠ.'),
    ('ዋጋው $50 ነው።', 'ዋጋው ሃምሳ ዶላር ነው.'),
    ('ዋጋው 20$ ብቻ ነው።', 'ዋጋው ሃያ ዶላር ብቻ ነው.'),
    ('መጽሐፉ 250 ብር ያወጣል።', 'መጽሐፉ ሁለት መቶ ሃምሳ ብር ያወጣል.'),
    ('የሙቀት መጠኑ -5 ዲግሪ ነው።', 'የሙቀት መጠኑ ሲቀነስ አምስት ዲግሪ ነው.'),
    ('ሙቀቱ 25° ደርሷል።', 'ሙቀቱ ሃያ አምስት ዲግሪ ደርሷል.'),
    ('ከ10-20 ሰዎች ይመጣሉ።', 'ከ አስር እስከ ሃያ ሰዎች ይመጣሉ.'),
    ('ከ1990–2000 ዓ.ም ኖረ።', 'ከ አንድ ሺህ ዘጠኝ መቶ ዘጠና እስከ ሁለት ሺህ ዓመተ ምሕረት ኖረ.'),
    ('2+3=5 ነው።', 'ሁለት ሲደመር ሶስት እኩል አምስት ነው.'),
    ('ወንድ/ሴት ይምረጡ።', 'ወንድ ወይም ሴት ይምረጡ.'),
    ('ሱቁ ቡና & ሻይ ይሸጣል።', 'ሱቁ ቡና እና ሻይ ይሸጣል.'),
    ('ኢሜይል abebe@example.com ይላኩ።', 'ኢሜይል ABEBE አት EXAMPLE.COM ይላኩ.'),
    ('ርዝመቱ 3.5 ሜትር ነው።', 'ርዝመቱ ሶስት ነጥብ አምስት ሜትር ነው.'),
    ('ምዕራፍ ፲፪ ቁጥር ፫', 'ምዕራፍ አስራ ሁለት ቁጥር ሶስት'),
    ('በ1985 ተወለደ።', 'በ አንድ ሺህ ዘጠኝ መቶ ሰማንያ አምስት ተወለደ.'),
    ('አንቀጽ 7(2) እንዲህ ይላል።', "አንቀጽ ሰባት ' ሁለት ' እንዲህ ይላል."),
    ('"እሺ" አለ፤ ሄደም።', "'እሺ' አለ, ሄደም."),
    ('የውጤቱ #1 ተማሪ ሸለመ።', 'የውጤቱ ቁጥር አንድ ተማሪ ሸለመ.'),
    ('ምን ሆነ? — ምንም!', 'ምን ሆነ? ምንም!'),
    ('ውሳኔው * በሙሉ ድምጽ * ጸደቀ።', 'ውሳኔው በሙሉ ድምጽ ጸደቀ.'),
]


@pytest.mark.parametrize("raw, expected", SENTENCES)
def test_sentence_reads_as_a_speaker_reads_it(raw, expected):
    assert normalize_text(raw) == expected


def test_the_table_is_big_enough_and_every_output_is_idempotent():
    assert len(SENTENCES) >= 40
    assert all(normalize_text(expected) == expected for _, expected in SENTENCES)


@pytest.mark.parametrize("n, word", [
    (1, "አንደኛ"), (2, "ሁለተኛ"), (3, "ሶስተኛ"), (4, "አራተኛ"), (5, "አምስተኛ"), (6, "ስድስተኛ"), (7, "ሰባተኛ"),
    (8, "ስምንተኛ"), (9, "ዘጠነኛ"), (10, "አስረኛ"), (12, "አስራ ሁለተኛ"), (20, "ሃያኛ"), (30, "ሰላሳኛ"), (100, "መቶኛ"),
    (1000, "አንድ ሺኛ"), (1_000_000, "አንድ ሚሊዮነኛ"),
])
def test_ordinal_words(n, word):
    assert ordinal_word(n) == word


def test_folding_is_an_option_off_by_default_and_keeps_labialised_letters():
    text = "ሐሰን ኀይል ሠራ ዐይን ፀሐይ ኈ"
    assert normalize_text(text) == text
    assert normalize_text(text, fold=True) == "ሀሰን ሀይል ሰራ አይን ጸሀይ ኈ"
    assert fold_same_sound("ሖ ሦ ዖ ፆ") == "ሆ ሶ ኦ ጾ"


def test_every_ethiopic_letter_labialised_forms_included():
    letters = script_letters()
    assert {"ኀ", "ኣ", "ኧ", "ኈ", "ቋ", "ጐ", "ሟ"} <= set(letters) and len(letters) > 400
    assert not set(letters) & set("፩፲፻።፣")  # numerals and punctuation are not letters


def test_no_character_of_the_real_text_survives_that_the_base_cannot_hold():
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_file=str(REAL_TEXT.parents[1] / "bpe.model"))
    text = normalize_text(REAL_TEXT.read_text(encoding="utf-8"))
    # script characters become pieces of the extension; everything else must be something the base holds
    left = {ch for ch in set(base.normalize(text)) - {" "}
            if not is_script_char(ch) and base.unk_id() in base.encode(ch)}
    assert left == set()


def test_normaliser_record_round_trip_and_other_version_stops(tmp_path):
    assert normalizer_record(True) == {"version": NORMALIZER_VERSION, "fold_same_sound": True}
    assert check_normalizer_record(normalizer_record(True), "x") is True
    with pytest.raises(FidelError, match=r"old\.json.*normaliser version 1.*version 2"):
        check_normalizer_record({"version": 1}, tmp_path / "old.json")
    with pytest.raises(FidelError, match=r"normaliser version 1"):
        check_normalizer_record(None, "record without a normaliser")
    assert recorded_fold(tmp_path / "no_record.model") is False
