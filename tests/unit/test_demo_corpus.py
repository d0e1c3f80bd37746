import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fidel_tts.flows.demo.codec import SAMPLE_RATE, DemoCodec
from fidel_tts.flows.demo.corpus import (
    SPEAKERS,
    amharic_sentences,
    amharic_words,
    build_demo_corpus,
    build_utterances,
    english_sentences,
    ethiopic_numeral,
    ethiopic_numeral_value,
    speakable,
    synthesize,
    write_paired_manifests,
)
from fidel_tts.trainer.errors import FidelError


def _have_aspell_am() -> bool:
    try:
        amharic_words()
    except FidelError:
        return False
    return True


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng not installed (apt-get install espeak-ng)")
needs_aspell = pytest.mark.skipif(not _have_aspell_am(),
                                  reason="aspell-am not installed (apt-get install aspell-am)")
needs_words = pytest.mark.skipif(not Path("/usr/share/dict/american-english").exists(),
                                 reason="wamerican not installed (apt-get install wamerican)")

MANIFEST_FIELDS = {
    "id", "speaker", "language",
    "prompt_id", "prompt_audio_path", "prompt_condition_path", "prompt_condition_len", "prompt_emo_vec_path",
    "prompt_duration",
    "target_id", "target_audio_path", "target_text", "target_text_ids_path", "target_text_len",
    "target_codes_path", "target_code_len", "target_emo_vec_path", "target_duration",
}
AMHARIC_ALLOWED = re.compile(r"^[\u1200-\u135A\u1369-\u137C0-9 ፣፤።፧!]+$")
COND_DIM = 32


def toy_encode(text: str) -> list[int]:
    return [2 + ord(ch) % 997 for ch in text]


def test_ethiopic_numerals():
    assert ethiopic_numeral(12) == "፲፪" and ethiopic_numeral(90) == "፺" and ethiopic_numeral(7) == "፯"
    assert all(ethiopic_numeral_value(ethiopic_numeral(n)) == n for n in range(1, 100))
    assert ethiopic_numeral_value("፻፳") == 120 and ethiopic_numeral_value("፪፻") == 200
    assert speakable("ዓመት ፲፪ ነው።") == "ዓመት 12 ነው።"


@needs_aspell
def test_amharic_sentences():
    sentences = amharic_sentences(300, seed=0)
    assert sentences == amharic_sentences(300, seed=0)
    assert sentences != amharic_sentences(300, seed=1)
    assert len(set(sentences)) == 300
    for s in sentences:
        assert AMHARIC_ALLOWED.match(s), s
        assert 3 <= len(s.split()) <= 10, s
        assert s[-1] in "።፧!"
    assert sum(s.endswith("።") for s in sentences) > 0.7 * len(sentences)
    joined = "".join(sentences)
    assert "፣" in joined and "፤" in joined
    assert re.search(r"[\u1369-\u137C]", joined) and re.search(r"[0-9]", joined)


@needs_words
def test_english_sentences():
    sentences = english_sentences(200, seed=0)
    assert sentences == english_sentences(200, seed=0)
    assert sentences != english_sentences(200, seed=1)
    for s in sentences:
        assert re.fullmatch(r"[A-Z][a-z]*( [a-z]+,?)* [a-z]+[.?!]", s), s
        assert 3 <= len(s.split()) <= 10
    assert any("," in s for s in sentences) and any(s.endswith("?") for s in sentences)
    assert any(s.endswith("!") for s in sentences)  # the base must learn every mark Amharic maps to


@needs_espeak
@pytest.mark.parametrize("voice,text", [("am", "ሰላም ነው፣ ዛሬ ፲፪ ሰዓት ነው።"),
                                        ("en-us", "Hello there, how are you?")])
def test_synthesize(tmp_path, voice, text):
    out = tmp_path / "a" / "u.wav"
    seconds = synthesize(text, voice, SPEAKERS[0], out)
    wav, sr = sf.read(out)
    assert sr == SAMPLE_RATE and wav.ndim == 1
    assert abs(wav.size / sr - seconds) < 1e-6
    assert 0.8 < seconds < 8.0
    assert [p.name for p in out.parent.iterdir()] == ["u.wav"]  # no temp files left behind


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None or not _have_aspell_am():
        pytest.skip("needs espeak-ng and aspell-am")
    root = tmp_path_factory.mktemp("demo")
    return build_demo_corpus(root, am_per_speaker=4, en_per_speaker=3, codebook_size=16, cond_dim=COND_DIM,
                             seed=0, progress=False)


def test_corpus_build(corpus):
    assert len(corpus.am_records) == 6 * 4 and len(corpus.en_records) == 6 * 3
    assert len({r.utterance.text for r in corpus.am_records}) == len(corpus.am_records)
    assert DemoCodec.load(corpus.codec_path).size == corpus.codebook_size == 16
    am_lines = corpus.am_text_path.read_text(encoding="utf-8").splitlines()
    assert am_lines == [r.utterance.text for r in corpus.am_records]
    assert len(corpus.en_text_path.read_text(encoding="utf-8").splitlines()) == 6 * 3
    for rec in corpus.am_records + corpus.en_records:
        u = rec.utterance
        assert u.wav_path == corpus.root / "wav" / u.lang / u.speaker / f"{u.id}.wav"
        codes = np.load(rec.codes_path)
        assert codes.dtype == np.int32 and codes.shape == (rec.code_len,)
        assert 0 <= codes.min() and codes.max() < 16
        assert abs(rec.code_len - u.duration * 50) <= 2
        cond, emo = np.load(rec.condition_path), np.load(rec.emo_vec_path)
        assert cond.dtype == np.float32 and cond.shape == (32, COND_DIM)
        assert emo.dtype == np.float32 and emo.shape == (COND_DIM,)


def test_corpus_is_idempotent_and_resumable(corpus):
    params = dict(am_per_speaker=4, en_per_speaker=3, codebook_size=16, cond_dim=COND_DIM, seed=0,
                  progress=False)
    marker = corpus.root / "corpus.json"
    stamp = marker.stat().st_mtime_ns
    again = build_demo_corpus(corpus.root, **params)
    assert marker.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert [r.utterance.id for r in again.am_records] == [r.utterance.id for r in corpus.am_records]
    assert again.am_records[0].codes_path == corpus.am_records[0].codes_path

    # A missing feature file means the dir is half-built: it is rebuilt, to the same content.
    codes = np.load(corpus.en_records[0].codes_path)
    corpus.en_records[0].codes_path.unlink()
    rebuilt = build_demo_corpus(corpus.root, **params)
    assert np.array_equal(np.load(rebuilt.en_records[0].codes_path), codes)


@pytest.fixture(scope="module")
def manifests(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifests")
    am = write_paired_manifests(corpus.am_records, toy_encode, out, val_fraction=0.5, seed=0, name="am")
    en = write_paired_manifests(corpus.en_records, toy_encode, out, val_fraction=0.1, seed=0, name="en")
    return out, am, en


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_manifest_rows(corpus, manifests):
    out, am, en = manifests
    by_id = {r.utterance.id: r for r in corpus.am_records + corpus.en_records}
    for path in (*am, *en):
        assert path.parent == out
        for row in _rows(path):
            assert set(row) == MANIFEST_FIELDS
            assert row["id"] == f"{row['target_id']}__{row['prompt_id']}"
            assert row["prompt_id"] != row["target_id"]
            target, prompt = by_id[row["target_id"]], by_id[row["prompt_id"]]
            assert row["speaker"] == target.utterance.speaker == prompt.utterance.speaker
            assert row["language"] == target.utterance.lang
            assert row["target_text"] == target.utterance.text
            for key in row:
                if key.endswith("_path"):
                    assert not Path(row[key]).is_absolute()
                    assert (out / row[key]).is_file(), row[key]
            ids = np.load(out / row["target_text_ids_path"])
            assert ids.dtype == np.int32 and ids.tolist() == toy_encode(row["target_text"])
            assert row["target_text_len"] == len(ids)
            assert np.load(out / row["target_codes_path"]).shape == (row["target_code_len"],)
            condition = np.load(out / row["prompt_condition_path"])
            assert condition.shape == (row["prompt_condition_len"], COND_DIM)
            assert row["prompt_condition_len"] == 32
            assert (out / row["prompt_audio_path"]).resolve() == prompt.utterance.wav_path.resolve()


def test_manifest_split_is_leak_free(corpus, manifests):
    _, (am_train, am_val), (en_train, en_val) = manifests
    train, val = _rows(am_train), _rows(am_val)
    assert len(train) == len(val) == 12  # 4 per speaker, half to val, every utterance a target once
    train_ids = {r["target_id"] for r in train} | {r["prompt_id"] for r in train}
    val_ids = {r["target_id"] for r in val} | {r["prompt_id"] for r in val}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {r.utterance.id for r in corpus.am_records}
    assert len({r["target_id"] for r in train}) == len(train)
    # 3 per speaker cannot give two pairable sides, so nothing goes to val
    assert len(_rows(en_train)) == 18 and _rows(en_val) == []


def test_manifests_deterministic(corpus, manifests, tmp_path):
    out, (am_train, am_val), _ = manifests
    again = write_paired_manifests(corpus.am_records, toy_encode, out, val_fraction=0.5, seed=0, name="again")
    assert again[0].read_text() == am_train.read_text() and again[1].read_text() == am_val.read_text()
    other = write_paired_manifests(corpus.am_records, toy_encode, out, val_fraction=0.5, seed=1, name="other")
    assert other[0].read_text() != am_train.read_text()


def test_conditioning_identifies_speaker(corpus):
    """Same speaker, different sentences: emotion vectors sit closer than across speakers."""
    emo = {}
    for rec in corpus.am_records + corpus.en_records:
        emo.setdefault(rec.utterance.speaker, []).append(np.load(rec.emo_vec_path))
    centroids = {s: np.mean(v, axis=0) for s, v in emo.items()}
    nearest = [(s, min(centroids, key=lambda c: np.linalg.norm(v - centroids[c])))
               for s, vs in emo.items() for v in vs]
    hits = [s == guess for s, guess in nearest]
    assert np.mean(hits) >= 0.9


def test_missing_tools_raise_fidel_error(monkeypatch, tmp_path):
    import fidel_tts.flows.demo.corpus as dc

    def no_such_program(*args, **kwargs):
        raise FileNotFoundError(args[0][0])

    monkeypatch.setattr(dc.subprocess, "run", no_such_program)
    dc.amharic_words.cache_clear()
    try:
        with pytest.raises(FidelError, match="aspell-am"):
            dc.amharic_words()
    finally:
        dc.amharic_words.cache_clear()
    with pytest.raises(FidelError, match="apt-get install espeak-ng"):
        synthesize("hello there", "en-us", SPEAKERS[0], tmp_path / "u.wav")


def test_unknown_language(tmp_path):
    with pytest.raises(FidelError, match="unknown demo language"):
        build_utterances(tmp_path, "xx", 1)
