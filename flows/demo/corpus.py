"""A small synthetic two-language corpus (Amharic + English) for demos and tests, with no downloads.

Sentences come from installed word lists (aspell-am, wamerican), audio from espeak-ng with several
voice variants as "speakers", and features from the demo codec (flows/demo/codec.py). The output is
the community trainers' paired-manifest format, so the real data checks and training path run on it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from fidel_tts.flows.demo.codec import (
    CONDITION_LATENTS,
    SAMPLE_RATE,
    DemoCodec,
    demo_conditioning,
    fit_codec,
    log_mel,
)
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.training.progress import tracked

ENGLISH_WORDS = Path("/usr/share/dict/american-english")
LANG_VOICES = {"am": "am", "en": "en-us"}
CORPUS_FORMAT = 2
MAX_KMEANS_FRAMES = 40_000  # enough for a 256-entry codebook; keeps the fit to a few seconds
SYNTH_WORKERS = 2  # espeak-ng runs in a subprocess, so threads overlap without the GIL in the way


# ---------------------------------------------------------------- sentences

ETHIOPIC_ONES = "፩፪፫፬፭፮፯፰፱"  # 1..9
ETHIOPIC_TENS = "፲፳፴፵፶፷፸፹፺"  # 10..90
ETHIOPIC_HUNDRED, ETHIOPIC_MYRIAD = "፻", "፼"
ETHIOPIC_SYLLABLE = re.compile(r"^[\u1200-\u135A]+$")
ETHIOPIC_NUMBER = re.compile(r"[\u1369-\u137C]+")


def ethiopic_numeral(n: int) -> str:
    """Ethiopic numeral for 1..99 (e.g. 12 -> ፲፪)."""
    if not 1 <= n <= 99:
        raise ValueError(f"ethiopic_numeral supports 1..99, got {n}")
    tens, ones = divmod(n, 10)
    return (ETHIOPIC_TENS[tens - 1] if tens else "") + (ETHIOPIC_ONES[ones - 1] if ones else "")


def ethiopic_numeral_value(s: str) -> int:
    """Value of an Ethiopic numeral string (፲፪ -> 12, ፻፳ -> 120, ፪፻ -> 200)."""
    total, current = 0, 0
    for ch in s:
        if ch == ETHIOPIC_HUNDRED:
            current = max(current, 1) * 100
        elif ch == ETHIOPIC_MYRIAD:
            total, current = (total + max(current, 1)) * 10000, 0
        elif ch in ETHIOPIC_TENS:
            current += 10 * (ETHIOPIC_TENS.index(ch) + 1)
        elif ch in ETHIOPIC_ONES:
            current += ETHIOPIC_ONES.index(ch) + 1
        else:
            raise ValueError(f"not an Ethiopic numeral character: {ch!r}")
    return total + current


@lru_cache(maxsize=1)
def amharic_words(max_letters: int = 5) -> tuple[str, ...]:
    """Sorted Amharic words of 2..max_letters syllables from the aspell-am master dictionary."""
    try:
        proc = subprocess.run(["aspell", "-d", "am", "dump", "master"], capture_output=True, check=False)
    except FileNotFoundError as e:
        raise FidelError("aspell", "not installed; apt-get install aspell aspell-am") from e
    if proc.returncode != 0:
        raise FidelError("aspell -d am", "Amharic dictionary missing; apt-get install aspell-am")
    lines = proc.stdout.decode("utf-8", errors="replace").split()
    words = {w.split("/")[0] for w in lines}
    words = sorted(w for w in words if 2 <= len(w) <= max_letters and ETHIOPIC_SYLLABLE.match(w))
    if len(words) < 100:
        raise FidelError("aspell -d am", f"only {len(words)} usable Amharic words; reinstall aspell-am")
    return tuple(words)


@lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """Sorted lowercase ASCII words of 2..8 letters from wamerican."""
    if not ENGLISH_WORDS.exists():
        raise FidelError(ENGLISH_WORDS, "missing; apt-get install wamerican")
    text = ENGLISH_WORDS.read_text(encoding="utf-8", errors="replace")
    return tuple(sorted({w for w in text.split() if re.fullmatch(r"[a-z]{2,8}", w)}))


def _amharic_sentence(words: tuple[str, ...], rng: random.Random) -> str:
    tokens = [rng.choice(words) for _ in range(rng.randint(3, 10))]
    r = rng.random()
    if r < 0.15:
        tokens[rng.randrange(len(tokens))] = ethiopic_numeral(rng.randint(1, 99))
    elif r < 0.20:
        tokens[rng.randrange(len(tokens))] = str(rng.choice([rng.randint(2, 99), rng.randint(1900, 2030)]))
    if len(tokens) >= 5 and rng.random() < 0.35:
        tokens[rng.randrange(1, len(tokens) - 2)] += "፣"
    if len(tokens) >= 6 and rng.random() < 0.15:
        i = rng.randrange(1, len(tokens) - 2)
        tokens[i] = tokens[i].rstrip("፣") + "፤"
    r = rng.random()
    end = "።" if r < 0.85 else ("፧" if r < 0.95 else "!")
    return " ".join(tokens) + end


def _english_sentence(words: tuple[str, ...], rng: random.Random) -> str:
    tokens = [rng.choice(words) for _ in range(rng.randint(3, 10))]
    tokens[0] = tokens[0].capitalize()
    if len(tokens) >= 5 and rng.random() < 0.3:
        tokens[rng.randrange(1, len(tokens) - 2)] += ","
    r = rng.random()  # the base needs every mark Amharic punctuation normalises to, "!" included
    return " ".join(tokens) + ("." if r < 0.75 else ("?" if r < 0.9 else "!"))


def _unique_sentences(n: int, make: Callable[[random.Random], str], seed: int) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = make(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def amharic_sentences(n: int, seed: int) -> list[str]:
    """n distinct Amharic sentences (3-10 dictionary words, Ge'ez punctuation, some numerals)."""
    words = amharic_words()
    return _unique_sentences(n, lambda rng: _amharic_sentence(words, rng), seed)


def english_sentences(n: int, seed: int) -> list[str]:
    """n distinct English sentences (3-10 dictionary words, with , . ? !)."""
    words = english_words()
    return _unique_sentences(n, lambda rng: _english_sentence(words, rng), seed)


SENTENCES = {"am": amharic_sentences, "en": english_sentences}


# ---------------------------------------------------------------- speakers and synthesis

@dataclass(frozen=True)
class Speaker:
    name: str
    variant: str  # espeak-ng voice variant, appended as <voice>+<variant>
    pitch: int  # espeak-ng -p, 0..99
    speed: int  # espeak-ng -s, words per minute


SPEAKERS: tuple[Speaker, ...] = (
    Speaker("m3", "m3", 35, 150),
    Speaker("f2", "f2", 60, 165),
    Speaker("m1", "m1", 45, 140),
    Speaker("f4", "f4", 72, 155),
    Speaker("m7", "m7", 25, 175),
    Speaker("f3", "f3", 55, 145),
)


def speakable(text: str) -> str:
    """Text as espeak-ng should read it: its Amharic voice skips Ethiopic numerals but reads digits."""
    return ETHIOPIC_NUMBER.sub(lambda m: str(ethiopic_numeral_value(m.group())), text)


def _trim_silence(wav: np.ndarray, sr: int, margin_s: float = 0.04) -> np.ndarray:
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    loud = np.flatnonzero(np.abs(wav) > max(1e-3, 0.01 * peak))
    if loud.size == 0:
        return wav
    margin = int(margin_s * sr)
    return wav[max(0, loud[0] - margin): loud[-1] + margin + 1]


def synthesize(text: str, lang_voice: str, speaker: Speaker, out_wav: Path) -> float:
    """Speak `text` with espeak-ng as `speaker`, write 16 kHz mono PCM16 to out_wav; return seconds."""
    out_wav = Path(out_wav)
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    raw = out_wav.with_name(out_wav.stem + ".espeak.tmp.wav")
    cmd = ["espeak-ng", "-v", f"{lang_voice}+{speaker.variant}", "-p", str(speaker.pitch),
           "-s", str(speaker.speed), "-w", str(raw), "--stdin"]
    try:
        proc = subprocess.run(cmd, input=speakable(text).encode("utf-8"), capture_output=True, check=False)
    except FileNotFoundError as e:
        raise FidelError("espeak-ng", "not installed; apt-get install espeak-ng") from e
    if proc.returncode != 0 or not raw.exists():
        raise FidelError(out_wav, f"espeak-ng failed: {proc.stderr.decode(errors='replace').strip()[:200]}")
    wav, sr = sf.read(raw, dtype="float32", always_2d=True)
    raw.unlink()
    mono = torch.from_numpy(wav.mean(axis=1))
    if sr != SAMPLE_RATE:
        mono = torchaudio.functional.resample(mono, sr, SAMPLE_RATE)
    audio = _trim_silence(mono.numpy(), SAMPLE_RATE)
    if audio.size < SAMPLE_RATE // 20:
        raise FidelError(out_wav, f"espeak-ng produced no speech for {text!r}")
    tmp = out_wav.with_name(out_wav.stem + ".tmp.wav")
    sf.write(tmp, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    os.replace(tmp, out_wav)
    return audio.size / SAMPLE_RATE


@dataclass
class Utterance:
    id: str
    speaker: str
    lang: str
    text: str
    wav_path: Path
    duration: float


def build_utterances(root: Path, lang: str, sentences_per_speaker: int,
                     speakers: Iterable[Speaker] = SPEAKERS, seed: int = 0,
                     progress: bool = True) -> list[Utterance]:
    """Synthesise sentences_per_speaker different sentences per speaker into root/wav/<lang>/<speaker>/."""
    if lang not in LANG_VOICES:
        raise FidelError(None, f"unknown demo language {lang!r}; expected one of {sorted(LANG_VOICES)}")
    speakers = list(speakers)
    n = sentences_per_speaker
    sentences = SENTENCES[lang](n * len(speakers), seed)
    jobs = []
    for i, spk in enumerate(speakers):
        for j in range(n):
            uid = f"{lang}_{spk.name}_{j:04d}"
            jobs.append(Utterance(id=uid, speaker=spk.name, lang=lang, text=sentences[i * n + j],
                                  wav_path=Path(root) / "wav" / lang / spk.name / f"{uid}.wav", duration=0.0))
    by_name = {spk.name: spk for spk in speakers}

    def run(u: Utterance) -> float:
        return synthesize(u.text, LANG_VOICES[lang], by_name[u.speaker], u.wav_path)

    with ThreadPoolExecutor(SYNTH_WORKERS) as pool:
        durations = list(tracked(pool.map(run, jobs), f"espeak-ng {lang}", len(jobs), progress, unit="utt"))
    for u, d in zip(jobs, durations, strict=True):
        u.duration = d
    return jobs


# ---------------------------------------------------------------- features

@dataclass
class FeatureRecord:
    utterance: Utterance
    codes_path: Path
    condition_path: Path
    emo_vec_path: Path
    code_len: int


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def utterance_mel(u: Utterance) -> torch.Tensor:
    wav, sr = sf.read(u.wav_path, dtype="float32")
    return log_mel(wav, sr)


def write_features(utts: list[Utterance], codec: DemoCodec, cond_dim: int, root: Path,
                   progress: bool = False) -> list[FeatureRecord]:
    """Per utterance: codes/<id>.npy int32 [T], condition/<id>.npy f32 [32, D], emo_vec/<id>.npy f32 [D]."""
    root = Path(root)
    records = []
    for u in tracked(utts, "features", len(utts), progress, unit="utt"):
        mel = utterance_mel(u)
        codes = codec.encode(mel).numpy().astype(np.int32)
        condition, emo_vec = demo_conditioning(mel, cond_dim)
        rec = FeatureRecord(utterance=u, codes_path=root / "codes" / f"{u.id}.npy",
                            condition_path=root / "condition" / f"{u.id}.npy",
                            emo_vec_path=root / "emo_vec" / f"{u.id}.npy", code_len=int(codes.shape[0]))
        _save_npy(rec.codes_path, codes)
        _save_npy(rec.condition_path, condition)
        _save_npy(rec.emo_vec_path, emo_vec)
        records.append(rec)
    return records


# ---------------------------------------------------------------- paired manifests

def _val_count(n: int, val_fraction: float) -> int:
    want = round(n * val_fraction)
    if want == 0:
        return 0
    want = max(want, 2)  # a side needs two utterances of the speaker to form a pair
    return want if n - want >= 2 else 0


def _pairs(records: list[FeatureRecord], rng: random.Random) -> list[tuple[FeatureRecord, FeatureRecord]]:
    """(target, prompt) for every record; the prompt is the next one in a shuffled cycle, so never itself."""
    if len(records) < 2:
        return []
    order = list(records)
    rng.shuffle(order)
    return [(order[i], order[(i + 1) % len(order)]) for i in range(len(order))]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), start.resolve())).as_posix()


def _manifest_row(target: FeatureRecord, prompt: FeatureRecord, ids_path: Path, n_ids: int,
                  out_dir: Path) -> dict:
    t, p = target.utterance, prompt.utterance
    return {
        "id": f"{t.id}__{p.id}",
        "speaker": t.speaker,
        "language": t.lang,
        "prompt_id": p.id,
        "prompt_audio_path": _rel(p.wav_path, out_dir),
        "prompt_condition_path": _rel(prompt.condition_path, out_dir),
        "prompt_condition_len": CONDITION_LATENTS,
        "prompt_emo_vec_path": _rel(prompt.emo_vec_path, out_dir),
        "prompt_duration": round(p.duration, 4),
        "target_id": t.id,
        "target_audio_path": _rel(t.wav_path, out_dir),
        "target_text": t.text,
        "target_text_ids_path": _rel(ids_path, out_dir),
        "target_text_len": n_ids,
        "target_codes_path": _rel(target.codes_path, out_dir),
        "target_code_len": target.code_len,
        "target_emo_vec_path": _rel(target.emo_vec_path, out_dir),
        "target_duration": round(t.duration, 4),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_paired_manifests(records: list[FeatureRecord], encode: Callable[[str], list[int]], out_dir: Path,
                           val_fraction: float, seed: int, name: str) -> tuple[Path, Path]:
    """Write text_ids/<id>.npy and out_dir/<name>_train.jsonl, <name>_val.jsonl (paths relative to out_dir).

    Val utterances are chosen per speaker first and pairs are formed within each side, so no val
    utterance is a train target or prompt.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids_paths: dict[str, tuple[Path, int]] = {}
    for rec in records:
        ids = np.asarray(encode(rec.utterance.text), dtype=np.int32)
        path = out_dir / "text_ids" / f"{rec.utterance.id}.npy"
        _save_npy(path, ids)
        ids_paths[rec.utterance.id] = (path, int(ids.shape[0]))

    by_speaker: dict[str, list[FeatureRecord]] = {}
    for rec in sorted(records, key=lambda r: r.utterance.id):
        by_speaker.setdefault(rec.utterance.speaker, []).append(rec)
    rng = random.Random(seed)
    train_rows, val_rows = [], []
    for speaker in sorted(by_speaker):
        recs = by_speaker[speaker]
        shuffled = list(recs)
        rng.shuffle(shuffled)
        n_val = _val_count(len(recs), val_fraction)
        for rows, side in ((val_rows, shuffled[:n_val]), (train_rows, shuffled[n_val:])):
            for target, prompt in _pairs(side, rng):
                ids_path, n_ids = ids_paths[target.utterance.id]
                rows.append(_manifest_row(target, prompt, ids_path, n_ids, out_dir))
    train_path, val_path = out_dir / f"{name}_train.jsonl", out_dir / f"{name}_val.jsonl"
    _write_jsonl(train_path, train_rows)
    _write_jsonl(val_path, val_rows)
    return train_path, val_path


# ---------------------------------------------------------------- the whole demo corpus

@dataclass
class DemoCorpus:
    root: Path
    codec_path: Path
    codebook_size: int
    cond_dim: int
    am_records: list[FeatureRecord]
    en_records: list[FeatureRecord]
    am_text_path: Path
    en_text_path: Path


def _record_to_json(rec: FeatureRecord, root: Path) -> dict:
    u = rec.utterance
    return {"id": u.id, "speaker": u.speaker, "lang": u.lang, "text": u.text, "duration": u.duration,
            "wav_path": _rel(u.wav_path, root), "codes_path": _rel(rec.codes_path, root),
            "condition_path": _rel(rec.condition_path, root), "emo_vec_path": _rel(rec.emo_vec_path, root),
            "code_len": rec.code_len}


def _record_from_json(d: dict, root: Path) -> FeatureRecord:
    u = Utterance(id=d["id"], speaker=d["speaker"], lang=d["lang"], text=d["text"],
                  wav_path=root / d["wav_path"], duration=float(d["duration"]))
    return FeatureRecord(utterance=u, codes_path=root / d["codes_path"],
                         condition_path=root / d["condition_path"], emo_vec_path=root / d["emo_vec_path"],
                         code_len=int(d["code_len"]))


def _corpus_paths(root: Path) -> dict[str, Path]:
    return {"codec": root / "codec.pt", "am_text": root / "am_text.txt", "en_text": root / "en_text.txt",
            "manifest": root / "corpus.json"}


def _load_if_complete(root: Path, params: dict) -> DemoCorpus | None:
    paths = _corpus_paths(root)
    try:
        saved = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if saved.get("params") != params:
        return None
    am = [_record_from_json(d, root) for d in saved["am_records"]]
    en = [_record_from_json(d, root) for d in saved["en_records"]]
    files = [paths["codec"], paths["am_text"], paths["en_text"]]
    for r in am + en:
        files += [r.utterance.wav_path, r.codes_path, r.condition_path, r.emo_vec_path]
    if not all(p.exists() for p in files):
        return None
    return DemoCorpus(root=root, codec_path=paths["codec"], codebook_size=params["codebook_size"],
                      cond_dim=params["cond_dim"], am_records=am, en_records=en,
                      am_text_path=paths["am_text"], en_text_path=paths["en_text"])


def _kmeans_sample(mels: list[torch.Tensor], cap: int, seed: int) -> torch.Tensor:
    frames = torch.cat(mels, dim=0)
    if len(frames) <= cap:
        return frames
    gen = torch.Generator().manual_seed(seed)
    return frames[torch.randperm(len(frames), generator=gen)[:cap]]


def _write_text(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def build_demo_corpus(root: Path, *, am_per_speaker: int = 80, en_per_speaker: int = 80,
                      codebook_size: int = 256, cond_dim: int = 128, seed: int = 0, progress: bool = True,
                      speakers: Iterable[Speaker] = SPEAKERS) -> DemoCorpus:
    """Build (or load, if root/corpus.json says it is complete with these parameters) the demo corpus.

    Writes wav/, codes/, condition/, emo_vec/, codec.pt, am_text.txt, en_text.txt and, last, corpus.json.
    Tokenizers and manifests are the caller's: see write_paired_manifests.
    """
    root = Path(root)
    speakers = list(speakers)
    params = {"format": CORPUS_FORMAT, "am_per_speaker": am_per_speaker, "en_per_speaker": en_per_speaker,
              "codebook_size": codebook_size, "cond_dim": cond_dim, "seed": seed,
              "speakers": [asdict(s) for s in speakers]}
    done = _load_if_complete(root, params)
    if done is not None:
        return done
    paths = _corpus_paths(root)
    root.mkdir(parents=True, exist_ok=True)
    paths["manifest"].unlink(missing_ok=True)  # from here on the dir is half-built until corpus.json is back
    for sub in ("wav", "codes", "condition", "emo_vec"):
        shutil.rmtree(root / sub, ignore_errors=True)  # drop leftovers of other parameters

    am_utts = build_utterances(root, "am", am_per_speaker, speakers, seed=seed, progress=progress)
    en_utts = build_utterances(root, "en", en_per_speaker, speakers, seed=seed, progress=progress)
    mels = [utterance_mel(u) for u in am_utts + en_utts]
    codec = fit_codec([_kmeans_sample(mels, MAX_KMEANS_FRAMES, seed)], codebook_size, seed)
    codec_tmp = paths["codec"].with_name("codec.pt.tmp")
    codec.save(codec_tmp)
    os.replace(codec_tmp, paths["codec"])
    am_records = write_features(am_utts, codec, cond_dim, root, progress=progress)
    en_records = write_features(en_utts, codec, cond_dim, root, progress=progress)
    _write_text(paths["am_text"], [u.text for u in am_utts])
    _write_text(paths["en_text"], [u.text for u in en_utts])

    saved = {"params": params, "am_records": [_record_to_json(r, root) for r in am_records],
             "en_records": [_record_to_json(r, root) for r in en_records]}
    _write_text(paths["manifest"], [json.dumps(saved, ensure_ascii=False, indent=1)])
    return DemoCorpus(root=root, codec_path=paths["codec"], codebook_size=codebook_size, cond_dim=cond_dim,
                      am_records=am_records, en_records=en_records,
                      am_text_path=paths["am_text"], en_text_path=paths["en_text"])
