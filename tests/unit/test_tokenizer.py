import json
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.text.normalize import is_script_char, normalize_text, script_letters
from fidel_tts.trainer.text.tokenizer import (
    BASE_SAMPLES,
    NORMAL,
    USER_DEFINED,
    encode,
    extend_tokenizer,
    load_model_proto,
    load_tokenizer,
    processor_from_proto,
    read_corpus_files,
    train_base_tokenizer,
    train_in_memory,
    verify_tokenizer,
    write_model,
)
from sentencepiece import sentencepiece_model_pb2 as model_pb2

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "bpe.model"  # the official base tokenizer (data/README.md)

ENGLISH_WORDS = (
    "the a and of to in is it that was for on are with as his they be at one have this from by hot word but "
    "what some we can out other were all there when up use your how said an each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more"
).split()
AMHARIC_WORDS = (
    "ሰላም ዓለም እንዴት ነህ ኢትዮጵያ አዲስ አበባ ቤት ትምህርት መጽሐፍ ውሃ ዳቦ ቡና ሻይ ልጅ እናት አባት ወንድም እህት ሀገር "
    "ከተማ መንገድ ገበያ ሥራ ጊዜ ቀን ሌሊት ፀሐይ ጨረቃ ዝናብ ተራራ ወንዝ ባህር ፍቅር ደስታ ጤና ሰው ሴት ወንድ ትልቅ ትንሽ "
    "ጥሩ መጣ ሄደ በላ ጠጣ አየ ሰማ ተናገረ"
).split()
PREFIXES, SUFFIXES = ("", "የ", "በ", "ለ", "ከ"), ("", "ን", "ም", "ና", "ው", "ዎች")

# Each checks line a deliberately broken tokenizer must fail, alone.
BROKEN_VARIANTS = {
    "shifted_base_id": {"base_pieces"},
    "missing_script_char": {"script_coverage"},
    "wrong_size": {"vocab_size"},
    "bpe_rank_scores": {"new_piece_scores"},
}


SYLLABLES = "con ver sa tion pro duc ing ter mi nal ex pe ri ment al in for ma der stand ly ness ful re".split()


def english_sentences(n: int, seed: int = 0) -> list[str]:
    """Common English words mixed with made-up ones built from English syllables (for enough variety)."""
    rng = random.Random(seed)
    marks = [".", ",", "?", "!"]

    def word() -> str:
        if rng.random() < 0.6:
            return rng.choice(ENGLISH_WORDS)
        return "".join(rng.choices(SYLLABLES, k=rng.randint(2, 3)))

    return [" ".join(word() for _ in range(rng.randint(5, 12))) + rng.choice(marks) for _ in range(n)]


def amharic_sentences(n: int, seed: int = 0) -> list[str]:
    """Synthetic Amharic with clitics, Ge'ez punctuation and numerals. ኧረ appears only as that whole word,
    so its ኧ is a script character the unigram model always covers with a longer piece."""
    rng = random.Random(seed)
    sentences = []
    for i in range(n):
        words = [rng.choice(PREFIXES) + rng.choice(AMHARIC_WORDS) + rng.choice(SUFFIXES)
                 for _ in range(rng.randint(4, 9))]
        if i % 3 == 0:
            words.insert(rng.randrange(len(words)), "ኧረ")
        if i % 10 == 0:
            words.insert(1, rng.choice(["፲፱፻፹፭", "፻", "፼", "፪፻፼", "25"]))
        sentences.append(" ".join(words[:3]) + "፣ " + " ".join(words[3:]) + rng.choice(["።", "፧", "።"]))
    return sentences


def script_char_count(texts: list[str]) -> int:
    """Script characters an extension adds: every letter of the script, and any other script char the texts have."""
    return len(set(script_letters()) | {ch for t in texts for ch in normalize_text(t) if is_script_char(ch)})


def aspell_words() -> list[str]:
    if shutil.which("aspell") is None:
        pytest.skip("aspell is not installed (apt-get install aspell-am)")
    result = subprocess.run(["aspell", "-d", "am", "dump", "master"], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        pytest.skip(f"aspell Amharic dictionary absent: {result.stderr.strip()[:100]}")
    return sorted({w.split("/")[0] for w in result.stdout.split()})


def aspell_corpus(words: list[str]) -> list[str]:
    """Deterministic sentences: every dictionary word three times (bare, with a prefix, with a suffix), in
    three different orders, nine words a sentence with ፣ and ።, plus a few sentences with numerals."""
    n, prefixes, suffixes = len(words), PREFIXES[1:] + ("እንደ",), SUFFIXES[1:] + ("ህ",)
    forms = [words,
             [prefixes[i % len(prefixes)] + w for i, w in enumerate(words)],
             [w + suffixes[i % len(suffixes)] for i, w in enumerate(words)]]
    sentences = []
    for form, stride in zip(forms, (1, 7, 13), strict=True):
        order = [form[(i * stride) % n] for i in range(n)]
        for i in range(0, n, 9):
            group = order[i:i + 9]
            sentences.append(" ".join(group[:4]) + "፣ " + " ".join(group[4:]) + "።")
    sentences += ["በ፲፱፻፹፭ ዓመተ ምሕረት ፻ ሰዎች መጡ።", "፪፻፼ ብር በ2015 ተከፈለ፧", "ሰላም ዓለም፣ እንዴት ነህ?"]
    return sentences


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> Path:
    return train_base_tokenizer(english_sentences(300), tmp_path_factory.mktemp("base") / "small.model", 200)


@pytest.fixture(scope="module")
def small_extension(small_base, tmp_path_factory) -> dict:
    texts = amharic_sentences(400)
    size = 200 + 1 + script_char_count(texts) + 150
    out = tmp_path_factory.mktemp("ext") / "small_am.model"
    record = extend_tokenizer(small_base, texts, out, size, lang_tag="AM")
    return {"base": small_base, "candidate": out, "texts": texts, "size": size, "record": record}


@pytest.fixture(scope="module")
def official_extension(tmp_path_factory) -> dict:
    texts = aspell_corpus(aspell_words())
    out = tmp_path_factory.mktemp("official") / "am.model"
    start = time.perf_counter()
    record = extend_tokenizer(REFERENCE, texts, out, 24000, lang_tag="AM")
    seconds = time.perf_counter() - start
    return {"base": REFERENCE, "candidate": out, "texts": texts, "size": 24000, "record": record,
            "seconds": seconds}


@pytest.fixture(params=["small", "official"])
def extension(request) -> dict:
    return request.getfixturevalue(f"{request.param}_extension")


def verify(ext: dict, candidate: Path | None = None):
    return verify_tokenizer(candidate or ext["candidate"], ext["base"], ext["texts"],
                            config_text_tokens=ext["size"], checkpoint_text_rows=ext["size"] + 1)


# ----------------------------------------------------------------------------- the good extension

def test_official_base_extends_to_24000_and_passes_every_line(official_extension):
    ext, record = official_extension, official_extension["record"]
    report = verify(ext)
    assert report.passed, report.to_text()
    assert report.line("target_unk").value.startswith("0 <unk>")
    assert report.line("base_pieces").value.startswith("0 of 12000")
    assert record.base_sha256 == "b2a5ce8090d32da3642cc4f81fdc996376bc6dd3f4cd5e3d165f71120d9f2bc8"
    assert record.base_size == 12000 and record.lang_tag == "▁[AM]" and record.lang_tag_id == 12000
    assert 12000 + 1 + record.script_chars_added + record.unigram_pieces_added == 24000
    assert ext["seconds"] < 30, f"extension took {ext['seconds']:.1f} s"

    base, cand = load_model_proto(REFERENCE), load_model_proto(ext["candidate"])
    assert len(cand.pieces) == 24000
    assert [(p.piece, p.type, p.score) for p in cand.pieces[:12000]] == [(p.piece, p.type, p.score) for p in base.pieces]
    base_sp, cand_sp = processor_from_proto(base), processor_from_proto(cand)
    samples = list(BASE_SAMPLES) + ["I DON'T KNOW, MAYBE TOMORROW?", "北京欢迎你", "[EN] HELLO", "TEST 123"]
    for sample in samples:
        assert cand_sp.encode(sample) == base_sp.encode(sample), sample
    assert cand_sp.encode("HELLO WORLD, THIS IS A TEST.") == [11122, 10394, 10209, 10220, 10218, 10210, 10760, 10216]
    amharic = encode(cand_sp, "ሰላም ዓለም፣ እንዴት ነህ?")
    assert cand_sp.unk_id() not in amharic and base_sp.unk_id() in encode(base_sp, "ሰላም ዓለም፣ እንዴት ነህ?")
    assert cand_sp.decode(amharic) == "ሰላም ዓለም, እንዴት ነህ?"
    assert cand_sp.encode("[AM] ሰላም")[0] == 12000


def test_small_base_is_built_like_the_official_one(small_base):
    proto = load_model_proto(small_base)
    assert proto.trainer_spec.model_type == model_pb2.TrainerSpec.UNIGRAM
    assert not proto.trainer_spec.byte_fallback
    assert [(p.piece, p.type) for p in proto.pieces[:7]] == [
        ("<s>", 3), ("</s>", 3), ("<unk>", 2), ("▁[ZH]", USER_DEFINED), ("▁[EN]", USER_DEFINED),
        ("▁[JA]", USER_DEFINED), ("▁[KO]", USER_DEFINED)]
    assert proto.normalizer_spec.name == "nmt_nfkc" and len(proto.pieces) == 200
    assert not any(ch.islower() for p in proto.pieces if p.type == NORMAL for ch in p.piece)  # upper-cased text
    assert small_base.with_suffix(".vocab").read_text(encoding="utf-8").count("\n") == 200
    sp = load_tokenizer(small_base)
    assert sp.encode("[EN] THE TIME")[0] == 4 and sp.pad_id() == -1


def test_base_training_is_deterministic(small_base, tmp_path):
    again = train_base_tokenizer(english_sentences(300), tmp_path / "again.model", 200)
    assert again.read_bytes() == small_base.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "again.vocab"]  # no temp files left


def test_small_extension_passes_every_line_and_records_itself(small_extension):
    ext, record = small_extension, small_extension["record"]
    report = verify(ext)
    assert report.passed, report.to_text()
    assert len(load_model_proto(ext["candidate"]).pieces) == ext["size"]
    saved = json.loads(ext["candidate"].with_suffix(".json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(record.to_dict()))
    assert saved["out_sha256"] == report.line("sha256").value
    assert saved["corpus_sources"][0]["lines"] == len(ext["texts"])
    vocab = ext["candidate"].with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == ext["size"] and vocab[200] == "▁[AM]\t0"


def test_extension_is_deterministic(small_extension, tmp_path):
    ext = small_extension
    out = tmp_path / "again.model"
    record = extend_tokenizer(ext["base"], ext["texts"], out, ext["size"], lang_tag="AM")
    assert out.read_bytes() == ext["candidate"].read_bytes()
    assert record.out_sha256 == ext["record"].out_sha256


def test_new_pieces_are_script_chars_then_unigram_pieces_by_score(small_extension):
    proto, record = load_model_proto(small_extension["candidate"]), small_extension["record"]
    chars = proto.pieces[201:201 + record.script_chars_added]
    assert "".join(p.piece for p in chars) == record.script_chars
    assert all(len(p.piece) == 1 and is_script_char(p.piece) and p.type == NORMAL for p in chars)
    unigram = proto.pieces[201 + record.script_chars_added:]
    scores = [p.score for p in unigram]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    assert all(len(p.piece) > 1 for p in unigram)
    assert len({p.piece for p in proto.pieces}) == len(proto.pieces)


# ----------------------------------------------------------------------------- broken tokenizers

def broken_copy(ext: dict, variant: str, out: Path) -> Path:
    proto = load_model_proto(ext["candidate"])
    base_size = len(load_model_proto(ext["base"]).pieces)
    if variant == "shifted_base_id":
        # move the language tag at id 3 to id 6: ids 4..6 shift down by one
        moved = model_pb2.ModelProto.SentencePiece()
        moved.CopyFrom(proto.pieces[3])
        del proto.pieces[3]
        proto.pieces.insert(6, moved)
    elif variant == "missing_script_char":
        # a script char whose piece the corpus never needs (longer pieces cover it), so there is no <unk>
        sp = processor_from_proto(proto)
        used = {i for t in ext["texts"] for i in encode(sp, t)}
        unused_chars = [i for i in range(base_size, len(proto.pieces))
                        if len(proto.pieces[i].piece) == 1 and i not in used]
        assert unused_chars, "corpus has no script char covered only by longer pieces"
        proto.pieces[unused_chars[0]].piece *= 20  # longer than any piece sentencepiece can match
    elif variant == "wrong_size":
        del proto.pieces[-1]
    elif variant == "bpe_rank_scores":
        # what appending a BPE model gives: score = -(rank), here counted on from the end of the base
        new = [p for p in proto.pieces[base_size:] if p.type == NORMAL]
        for rank, piece in enumerate(new):
            piece.score = -float(base_size + rank)
    write_model(proto, out)
    return out


@pytest.mark.parametrize("variant", sorted(BROKEN_VARIANTS))
def test_broken_tokenizer_fails_its_own_line_and_no_other(extension, variant, tmp_path):
    report = verify(extension, broken_copy(extension, variant, tmp_path / f"{variant}.model"))
    assert set(report.failed) == BROKEN_VARIANTS[variant], report.to_text()


def test_good_tokenizer_fails_no_line(extension):
    report = verify(extension)
    assert report.failed == [], report.to_text()
    assert len(report.lines) == 11


@pytest.mark.parametrize("scores", ["ranks_from_zero", "positive"])
def test_rank_like_or_positive_scores_fail_the_score_line(small_extension, tmp_path, scores):
    proto = load_model_proto(small_extension["candidate"])
    new = [p for p in proto.pieces[200:] if p.type == NORMAL]
    for rank, piece in enumerate(new):
        piece.score = -float(rank) if scores == "ranks_from_zero" else float(len(new) - rank)
    write_model(proto, tmp_path / "x.model")
    report = verify(small_extension, tmp_path / "x.model")
    assert "new_piece_scores" in report.failed


def test_unk_and_round_trip_fail_for_a_char_the_corpus_needs(small_extension, tmp_path):
    proto = load_model_proto(small_extension["candidate"])
    sp = processor_from_proto(proto)
    used = {i for t in small_extension["texts"] for i in encode(sp, t)}
    needed = next(i for i in range(200, len(proto.pieces)) if len(proto.pieces[i].piece) == 1 and i in used)
    proto.pieces[needed].piece *= 20
    write_model(proto, tmp_path / "x.model")
    report = verify(small_extension, tmp_path / "x.model")
    assert {"target_unk", "script_coverage", "round_trip"} <= set(report.failed)
    assert "base_pieces" not in report.failed and "vocab_size" not in report.failed


def test_report_formats(small_extension):
    report = verify_tokenizer(small_extension["candidate"], small_extension["base"], small_extension["texts"])
    text = report.to_text().splitlines()
    assert len(text) == len(report.lines) and all(line.startswith("PASS ") for line in text)
    assert "PASS vocab_size" in report.to_text() and "skipped" in report.line("vocab_size").value
    markdown = report.to_markdown().splitlines()
    assert markdown[0] == "| check | result | value | detail |" and len(markdown) == len(report.lines) + 2
    assert report.to_dict()["passed"] is True and report.to_dict()["lines"][0]["name"] == "base_pieces"


def test_too_many_unused_pieces_fails_that_line(small_extension):
    ext = small_extension
    report = verify_tokenizer(ext["candidate"], ext["base"], ext["texts"][:3], max_unused_share=0.5)
    assert report.failed == ["unused_new_pieces"], report.to_text()


# ----------------------------------------------------------------------------- bad inputs

def test_missing_empty_and_corrupt_models_name_the_file(tmp_path):
    missing, empty, corrupt = tmp_path / "missing.model", tmp_path / "empty.model", tmp_path / "corrupt.model"
    empty.write_bytes(b"")
    corrupt.write_bytes(b"\xff\xfe this is not a sentencepiece model \x00\x01" * 10)
    for path, problem in [(missing, "not found"), (empty, "empty"), (corrupt, "not a")]:
        with pytest.raises(FidelError) as err:
            load_tokenizer(path)
        assert str(path) in str(err.value) and problem in str(err.value)
        assert "\n" not in str(err.value)
        with pytest.raises(FidelError, match=path.name):
            extend_tokenizer(path, ["ሰላም"], tmp_path / "out.model", 100)


def test_text_file_is_not_a_model(tmp_path):
    text = tmp_path / "notes.model"
    text.write_text("hello world\n", encoding="utf-8")
    with pytest.raises(FidelError, match="notes.model.*not a"):
        load_tokenizer(text)


def test_byte_fallback_base_is_refused(tmp_path):
    proto = train_in_memory([normalize_text(s) for s in english_sentences(300)], "bytes", model_type="unigram",
                            vocab_size=320, byte_fallback=True, bos_id=0, eos_id=1, unk_id=2, pad_id=-1)
    path = tmp_path / "bytes.model"
    write_model(proto, path)
    with pytest.raises(FidelError, match=r"bytes\.model.*byte_fallback"):
        extend_tokenizer(path, amharic_sentences(50), tmp_path / "out.model", 2000)


def test_bpe_base_is_refused(tmp_path):
    proto = train_in_memory([normalize_text(s) for s in english_sentences(300)], "bpe", model_type="bpe",
                            vocab_size=150, bos_id=0, eos_id=1, unk_id=2, pad_id=-1)
    path = tmp_path / "real_bpe.model"
    write_model(proto, path)
    with pytest.raises(FidelError, match=r"real_bpe\.model.*BPE"):
        extend_tokenizer(path, amharic_sentences(50), tmp_path / "out.model", 2000)


def test_extension_never_overwrites_its_base(small_base, tmp_path):
    base = tmp_path / "base.model"
    base.write_bytes(small_base.read_bytes())
    with pytest.raises(FidelError, match=r"base\.model.*overwrite"):
        extend_tokenizer(base, amharic_sentences(50), base, 1000)
    assert base.read_bytes() == small_base.read_bytes()


def test_target_size_too_small_names_the_base(small_base, tmp_path):
    texts = amharic_sentences(50)
    too_small = 200 + script_char_count(texts)
    with pytest.raises(FidelError, match=r"small\.model.*target size"):
        extend_tokenizer(small_base, texts, tmp_path / "out.model", too_small)
    assert not (tmp_path / "out.model").exists()


def corpus_file(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_empty_corpus_names_the_file(small_base, tmp_path):
    empty = corpus_file(tmp_path, "empty_corpus.txt", ["", "   ", "\t"])
    with pytest.raises(FidelError, match=r"empty_corpus\.txt.*no text"):
        read_corpus_files([empty])
    sources = [{"path": str(empty), "lines": 3, "sha256": "-"}]
    with pytest.raises(FidelError, match=r"empty_corpus\.txt.*empty"):
        extend_tokenizer(small_base, ["", "   ", "\t"], tmp_path / "out.model", 1000, corpus_sources=sources)


def test_wrong_script_corpus_names_the_file(small_base, tmp_path):
    english = corpus_file(tmp_path, "english.txt", english_sentences(50))
    texts, sources = read_corpus_files([english])
    with pytest.raises(FidelError, match=r"english\.txt.*wrong script"):
        extend_tokenizer(small_base, texts, tmp_path / "out.model", 1000, corpus_sources=sources)


def test_missing_and_non_utf8_corpus_files_are_named(tmp_path):
    with pytest.raises(FidelError, match=r"nowhere\.txt.*not found"):
        read_corpus_files([tmp_path / "nowhere.txt"])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(FidelError, match=r"latin1\.txt.*UTF-8"):
        read_corpus_files([latin1])


def test_corpus_too_small_for_target_names_corpus_and_numbers(small_base, tmp_path):
    corpus = corpus_file(tmp_path, "tiny.txt", amharic_sentences(20))
    texts, sources = read_corpus_files([corpus])
    with pytest.raises(FidelError, match=r"tiny\.txt.*supports at most size (\d+).*not 5000; use --size \1") as error:
        extend_tokenizer(small_base, texts, tmp_path / "out.model", 5000, corpus_sources=sources)
    largest = int(re.search(r"at most size (\d+)", str(error.value)).group(1))
    record = extend_tokenizer(small_base, texts, tmp_path / "out.model", largest, corpus_sources=sources)
    assert record.target_size == largest
    with pytest.raises(FidelError, match=r"tiny\.txt.*supports at most size"):
        extend_tokenizer(small_base, texts, tmp_path / "more.model", largest + 1, corpus_sources=sources)
    assert extend_tokenizer(small_base, texts, tmp_path / "max.model", "max", corpus_sources=sources).target_size \
        == largest


# ----------------------------------------------------------------------------- command line

def run_cli(argv: list[str]) -> int:
    from fidel_tts.flows.cli import main

    return main(argv)


def test_cli_extend_then_verify(small_base, tmp_path, capsys):
    texts = amharic_sentences(400)
    corpus = corpus_file(tmp_path, "am.txt", texts)
    size = 200 + 1 + script_char_count(texts) + 100
    out = tmp_path / "cli" / "am.model"
    assert run_cli(["tokenizer", "extend", "--base", str(small_base), "--corpus", str(corpus),
                    "--size", str(size), "--lang-tag", "AM", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".vocab").is_file() and out.with_suffix(".json").is_file()
    assert f"{size} pieces" in capsys.readouterr().out

    config = tmp_path / "config.yaml"
    config.write_text(f"gpt:\n  number_text_tokens: {size}\n", encoding="utf-8")
    report_json = tmp_path / "report.json"
    assert run_cli(["tokenizer", "verify", "--tokenizer", str(out), "--base", str(small_base), "--corpus",
                    str(corpus), "--config", str(config), "--json", str(report_json)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 11 and all(line.startswith("PASS ") for line in printed)
    assert json.loads(report_json.read_text(encoding="utf-8"))["passed"] is True

    config.write_text(f"gpt:\n  number_text_tokens: {size + 8}\n", encoding="utf-8")
    assert run_cli(["tokenizer", "verify", "--tokenizer", str(out), "--base", str(small_base), "--corpus",
                    str(corpus), "--config", str(config)]) == 1
    assert any(line.startswith("FAIL vocab_size") for line in capsys.readouterr().out.splitlines())


def test_cli_reads_checkpoint_text_rows(small_extension, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    ext = small_extension
    corpus = corpus_file(tmp_path, "am.txt", ext["texts"])
    checkpoint = tmp_path / "gpt.pth"
    common = ["tokenizer", "verify", "--tokenizer", str(ext["candidate"]), "--base", str(ext["base"]),
              "--corpus", str(corpus), "--checkpoint", str(checkpoint)]
    torch.save({"text_embedding.weight": torch.zeros(ext["size"] + 1, 4)}, checkpoint)
    assert run_cli(common) == 0
    torch.save({"model": {"gpt.text_embedding.weight": torch.zeros(ext["size"], 4)}}, checkpoint)
    assert run_cli(common) == 1
    assert "need" in capsys.readouterr().out
    torch.save({"other.weight": torch.zeros(2, 2)}, checkpoint)
    assert run_cli(common) == 2
    assert "gpt.pth" in capsys.readouterr().err


def test_cli_bad_input_is_one_error_line_and_exit_2(small_base, tmp_path, capsys):
    corpus = corpus_file(tmp_path, "am.txt", amharic_sentences(20))
    code = run_cli(["tokenizer", "extend", "--base", str(tmp_path / "nope.model"), "--corpus", str(corpus),
                    "--size", "1000", "--out", str(tmp_path / "out.model")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "nope.model" in err and err.count("\n") == 1
    bad_config = corpus_file(tmp_path, "config.yaml", ["gpt:", "  other: 1"])
    code = run_cli(["tokenizer", "verify", "--tokenizer", str(small_base), "--base", str(small_base),
                    "--corpus", str(corpus), "--config", str(bad_config)])
    assert code == 2 and "config.yaml" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real Amharic text

REAL_TEXT = Path(__file__).resolve().parents[1] / "data" / "amharic" / "amharic.txt"


@pytest.fixture(scope="module")
def real_split() -> tuple[list[str], list[str]]:
    """The Debian-translation excerpt (tests/data/amharic/README.md): every fifth line held out."""
    lines = [line for line in REAL_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [t for i, t in enumerate(lines) if i % 5], [t for i, t in enumerate(lines) if not i % 5]


def test_real_text_extends_to_the_size_its_error_names_and_verifies_held_out_text(real_split, tmp_path):
    train, held_out = real_split
    with pytest.raises(FidelError, match=r"supports at most size (\d+)") as error:
        extend_tokenizer(REFERENCE, train, tmp_path / "big.model", 24000, lang_tag="AM")
    largest = int(re.search(r"at most size (\d+)", str(error.value)).group(1))
    record = extend_tokenizer(REFERENCE, train, tmp_path / "am.model", largest, lang_tag="AM")
    assert record.target_size == largest and record.script_chars_added >= len(script_letters())
    report = verify_tokenizer(tmp_path / "am.model", REFERENCE, held_out)
    assert report.passed, report.to_text()


def test_verify_names_the_characters_behind_unk(small_extension):
    report = verify_tokenizer(small_extension["candidate"], small_extension["base"], ["ሰላም Ωμέγα ዓለም Ω"])
    assert "target_unk" in report.failed
    assert "'Ω' U+03A9 Lu x2" in report.line("target_unk").reason


def test_folding_is_recorded_and_verify_and_the_front_end_apply_it(real_split, tmp_path):
    pytest.importorskip("indextts.utils.front")
    from fidel_tts.trainer.text.normalize import FidelTextTokenizer

    train, held_out = real_split
    record = extend_tokenizer(REFERENCE, train, tmp_path / "fold.model", "max", fold=True)
    assert record.normalizer == {"version": 2, "fold_same_sound": True}
    saved = json.loads((tmp_path / "fold.json").read_text(encoding="utf-8"))
    assert saved["normalizer"] == record.normalizer
    assert verify_tokenizer(tmp_path / "fold.model", REFERENCE, held_out).passed
    front, sp = FidelTextTokenizer(tmp_path / "fold.model"), load_tokenizer(tmp_path / "fold.model")
    assert all(front.encode(t) == encode(sp, t, fold=True) for t in held_out)
    assert front.encode("ሐሰን") == front.encode("ሀሰን")
    saved["normalizer"]["version"] = 1
    (tmp_path / "fold.json").write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(FidelError, match=r"fold\.json.*normaliser version 1"):
        FidelTextTokenizer(tmp_path / "fold.model")
