"""fidel prepare: upstream's feature math, batched = one at a time, codes trimmed to each clip, resumable."""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest
import soundfile as sf
import torch
from fidel_tts.trainer.data.checks import CheckSettings
from fidel_tts.trainer.data.features import (
    SAMPLE_RATE,
    ClipAudio,
    FeatureModels,
    clip_features,
    read_audio,
    write_tiny_models,
)
from fidel_tts.trainer.data.prepare import PrepareSettings, prepare

DURATIONS = (0.7, 1.3, 0.9, 1.1, 0.75, 1.25)  # two speakers, three clips each


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Random-weight w2v-BERT (17 layers, width 1024), RepCodec and UnifiedVoice, saved like the real ones (half a
    GB in memory: module scope frees it after these tests)."""
    paths = write_tiny_models(tmp_path_factory.mktemp("models"), model_dim=32, codebook=64)
    return paths, FeatureModels.load(paths, torch.device("cpu"))


def voiced(seconds: float, seed: int) -> np.ndarray:
    """A speech-like test signal: a few harmonics with a wandering pitch, and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 110 + 40 * seed % 90 + 20 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.2 + rng.normal(0, 0.01, len(t))
    return wave.astype(np.float32)


def write_corpus(folder, name: str, clips: list[tuple[str, str, float, str]], seed: int = 0):
    """A JSONL manifest of (id, text, seconds, speaker) clips, written as 16 kHz wavs beside it."""
    rows = []
    for i, (uid, text, seconds, speaker) in enumerate(clips):
        path = folder / "wav" / f"{uid}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, voiced(seconds, seed + i), SAMPLE_RATE, subtype="FLOAT")
        rows.append({"id": uid, "text": text, "audio": f"wav/{uid}.wav", "speaker": speaker, "language": "am"})
    manifest = folder / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return manifest, rows


def upstream_prompt_path(models, wav):
    """IndexTTS2's own inference path for one prompt file, with the tiny models swapped into the real class:
    `_get_speaker_conditioning` (its s2mel and CAMPPlus parts stubbed: they feed the vocoder, not the GPT),
    `_get_emotion_conditioning`, merge_emovec, and inference_speech's conditioning latent."""
    from types import SimpleNamespace

    from indextts.infer_v2 import IndexTTS2

    tts = object.__new__(IndexTTS2)
    tts.extract_features, tts.semantic_model, tts.semantic_codec = models.extractor, models.w2v, models.codec
    tts.semantic_mean, tts.semantic_std, tts.gpt, tts.device = models.mean, models.std, models.gpt, "cpu"
    tts.cache_spk_cond = tts.cache_emo_cond = tts.cache_emo_audio_prompt = tts.cache_spk_audio_prompt = None
    tts.mel_fn = lambda audio: torch.zeros(1, 80, 10)
    tts.campplus_model = lambda feat: None
    tts.s2mel = SimpleNamespace(models={"length_regulator": lambda *a, **k: (None,)})
    with torch.no_grad():
        spk, _, _, _ = tts._get_speaker_conditioning(str(wav))
        emo = tts._get_emotion_conditioning(str(wav))
        codes = tts.semantic_codec.quantize(spk)[0]
        spk_len, emo_len = torch.tensor([spk.shape[-1]]), torch.tensor([emo.shape[-1]])  # upstream passes widths
        emo_vec = tts.gpt.merge_emovec(spk, emo, spk_len, emo_len, alpha=1.0)
        tts.gpt.post_init_gpt2_config(kv_cache=True)
        _, condition = tts.gpt.inference_speech(spk, torch.tensor([[5, 6, 7]]), emo, cond_lengths=spk_len,
                                                emo_cond_lengths=emo_len, emo_vec=emo_vec, do_sample=False,
                                                max_generate_length=2)
    return codes[0].numpy(), condition[0].numpy(), emo_vec[0].numpy()


@pytest.mark.parametrize("rate", [16000, 22050, 44100])
def test_features_equal_what_indextts2_inference_computes_for_the_prompt_file(tiny_models, tmp_path, rate):
    """The same readers, rates, resampling and 15 s cut as inference, for files at 16, 22.05 and 44.1 kHz (a 16 s
    clip is cut for the conditioning, its codes are of the whole clip)."""
    paths, models = tiny_models
    for seconds in (1.1, 16.0) if rate == 22050 else (1.1,):
        wav = tmp_path / f"prompt-{seconds}.wav"
        sf.write(wav, voiced(seconds * rate / SAMPLE_RATE, 3)[:int(seconds * rate)], rate, subtype="FLOAT")
        codes, condition, emo_vec = upstream_prompt_path(models, wav)
        clip, problem = read_audio(wav, PrepareSettings("c", "w", "x").limits)
        assert problem is None
        ours = clip_features(models, [clip])[0]
        if seconds < 15:  # speaker and emotion waves of one length: no padding, the same floats
            assert np.array_equal(ours.codes, codes) and np.array_equal(ours.condition, condition), rate
            assert np.array_equal(ours.emo_vec, emo_vec), rate
        else:  # the whole clip's codes; the cut prompt shares a padded batch with them (float rounding)
            assert len(ours.codes) > len(codes) and clip.seconds > 15.9
            np.testing.assert_allclose(ours.condition, condition, atol=5e-6, rtol=0)  # seen: 1.2e-6, ~5 ulp
            np.testing.assert_allclose(ours.emo_vec, emo_vec, atol=1e-6, rtol=0)


def test_w2v_bert_stops_at_layer_17_with_the_full_runs_hidden_state():
    from fidel_tts.trainer.data.features import HIDDEN_LAYER, up_to_layer
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    torch.manual_seed(0)
    config = Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=HIDDEN_LAYER + 3, num_attention_heads=2,
                                intermediate_size=16, conv_depthwise_kernel_size=5, feature_projection_input_dim=160)
    full = Wav2Vec2BertModel(config).eval()
    cut = up_to_layer(Wav2Vec2BertModel(config).eval(), HIDDEN_LAYER)
    cut.load_state_dict(full.state_dict(), strict=False)
    features, mask = torch.randn(2, 40, 160), torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    with torch.no_grad():
        want = full(input_features=features, attention_mask=mask, output_hidden_states=True).hidden_states
        got = cut(input_features=features, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(cut.encoder.layers) == HIDDEN_LAYER and len(got) == HIDDEN_LAYER + 1
    assert torch.equal(got[HIDDEN_LAYER], want[HIDDEN_LAYER])


def test_the_conditioning_weights_fidel_loads_are_in_the_official_gpt_pth():
    """Upstream UnifiedVoice at the release config (on the meta device: shapes only) against the official
    gpt.pth's key list (tests/data/indextts2_gpt_state_dict.json): every tensor load_conditioning_gpt needs is
    there with its shape."""
    from pathlib import Path

    from fidel_tts.trainer.data.features import CONDITIONING_PREFIXES, quiet_transformers
    from indextts.gpt.model_v2 import UnifiedVoice

    from tests.fixtures.layout_fixture import RELEASE_GPT

    quiet_transformers()
    with torch.device("meta"):
        gpt = UnifiedVoice(**RELEASE_GPT)
    wanted = {k: list(v.shape) for k, v in gpt.state_dict().items() if k.startswith(CONDITIONING_PREFIXES)}
    reference = json.loads((Path(__file__).resolve().parents[1] / "data" / "indextts2_gpt_state_dict.json").read_text())
    official = {entry["name"]: entry["shape"] for entry in reference["keys"]}
    assert len(wanted) > 300 and {k: official.get(k) for k in wanted} == wanted


def clip_of(wave: np.ndarray) -> ClipAudio:
    """A clip whose emotion wave is another array (as it always is when read): both paths are embedded."""
    return ClipAudio(wave, wave, wave * 0.9)


def test_batched_equals_one_at_a_time_and_each_clip_keeps_its_own_codes(tiny_models):
    _, models = tiny_models
    waves = [voiced(s, i) for i, s in enumerate((0.6, 1.9, 1.0, 0.6, 0.65))]  # 0.6 and 0.65 s share a bucket
    batched = clip_features(models, [clip_of(w) for w in waves])
    for wave, clip in zip(waves, batched, strict=True):
        alone = clip_features(models, [clip_of(wave)])[0]
        assert np.array_equal(clip.codes, alone.codes)
        np.testing.assert_allclose(clip.condition, alone.condition, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(clip.emo_vec, alone.emo_vec, atol=1e-5, rtol=1e-5)
        assert abs(len(clip.codes) - len(wave) / SAMPLE_RATE * 50) <= 1  # not the batch's longest length
    assert len(batched[0].codes) < len(batched[1].codes) / 3


def test_batches_are_buckets_of_similar_length():
    from fidel_tts.trainer.data.features import length_buckets

    assert length_buckets([100, 400, 110, 124, 126, 390, 90]) == [[6, 0, 2], [3, 4], [5, 1]]


def test_audio_is_read_downmixed_resampled_and_checked(tmp_path):
    import librosa
    import torchaudio

    limits = PrepareSettings("c", "w", "x", min_seconds=0.5, max_seconds=3.0).limits
    stereo = np.stack([voiced(1.0, 1), voiced(1.0, 2)], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 22050, subtype="FLOAT")
    clip, problem = read_audio(tmp_path / "stereo.wav", limits)
    at_22k = torch.from_numpy(librosa.load(tmp_path / "stereo.wav")[0]).unsqueeze(0)
    speaker = torchaudio.transforms.Resample(22050, SAMPLE_RATE)(at_22k)[0].numpy()
    emotion = librosa.load(tmp_path / "stereo.wav", sr=SAMPLE_RATE)[0]
    assert problem is None and np.array_equal(clip.speaker, speaker) and np.array_equal(clip.emotion, emotion)
    assert clip.speaker_prompt is clip.speaker
    cases = {"short": (voiced(0.2, 1), "duration"), "long": (voiced(3.5, 1), "duration"),
             "silent": (np.zeros(SAMPLE_RATE, np.float32), "silent"),
             "clipped": (np.clip(voiced(1.0, 1) * 20, -1, 1), "clipped")}
    for name, (samples, check) in cases.items():
        sf.write(tmp_path / f"{name}.wav", samples, SAMPLE_RATE, subtype="FLOAT")
        assert read_audio(tmp_path / f"{name}.wav", limits)[1][0] == check, name
    (tmp_path / "broken.wav").write_bytes(b"RIFF nonsense")
    assert read_audio(tmp_path / "broken.wav", limits)[1][0] == "unreadable_audio"
    assert read_audio(tmp_path / "absent.wav", limits)[1][0] == "missing_audio"


def test_a_wav_cut_off_mid_data_is_dropped_with_its_reason(tmp_path):
    limits = PrepareSettings("c", "w", "x").limits
    sf.write(tmp_path / "whole.wav", voiced(2.0, 1), SAMPLE_RATE, subtype="PCM_16")
    data = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:len(data) // 2])
    assert sf.info(str(tmp_path / "cut.wav")).frames < 2 * SAMPLE_RATE  # what soundfile alone would accept
    assert read_audio(tmp_path / "whole.wav", limits)[1] is None
    check, detail = read_audio(tmp_path / "cut.wav", limits)[1]
    assert check == "truncated_audio" and "cut.wav" in detail and f"of the {2 * SAMPLE_RATE * 2} bytes" in detail


def test_manifests_are_jsonl_or_csv_with_the_community_fields(tmp_path):
    from fidel_tts.trainer.data.prepare import read_splits

    (tmp_path / "am.csv").write_text("id,text,audio,speaker,language\nb,ሰላም,wav/b.wav,s1,\na,ቤት,/abs/a.wav,s1,\n",
                                     encoding="utf-8-sig")
    row = {"id": "c", "text": "ውሃ", "audio": "c.flac", "speaker": "s2", "language": "am"}
    (tmp_path / "more.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    split = read_splits({"train": [f"{tmp_path / 'am.csv'}::am", str(tmp_path / "more.jsonl")]})["train"]
    assert [(u.id, u.speaker, u.language, u.line) for u in split] == [("a", "s1", "am", 3), ("b", "s1", "am", 2),
                                                                      ("c", "s2", "am", 1)]
    assert split[0].audio.as_posix() == "/abs/a.wav" and split[1].audio == tmp_path / "wav" / "b.wav"


def test_pairs_are_within_speakers_and_pass_the_data_checks(tiny_project, tmp_path):
    """pair_rows on made-up features: a NaN conditioning drops every pair it prompts, codes padded past the
    clip's duration are caught, the rest reach the dataset."""
    from fidel_tts.trainer.data.checks import CheckContext, Tokens
    from fidel_tts.trainer.data.parquet import DatasetBuilder
    from fidel_tts.trainer.data.prepare import Utterance, pair_rows

    ctx = CheckContext.from_paths(tiny_project.tokenizer, tiny_project.base_config, CheckSettings())
    texts = tiny_project.am_texts
    utterances = [Utterance(f"u{i}", texts[i], tmp_path / f"u{i}.wav", f"s{i % 2}", "am", tmp_path / "m.jsonl", i + 1)
                  for i in range(6)]
    rng = np.random.default_rng(0)
    features = {u.id: {"duration": 1.0, "codes": rng.integers(0, 64, 50), "condition": rng.normal(size=(32, 32)),
                       "emo_vec": rng.normal(size=32)} for u in utterances}
    features["u2"]["condition"][3, 4] = np.nan
    features["u5"]["codes"] = rng.integers(0, 64, 80)  # 80 codes for 1 s: padded
    settings = PrepareSettings("c", "w", "x")
    builder = DatasetBuilder(tmp_path, ctx)
    rows = pair_rows("train", utterances, features, Tokens.of({u.text for u in utterances}, ctx), ctx, settings,
                     builder)
    builder.abort()
    assert len(rows) == 12 and all(int(r.pair.target_id[1]) % 2 == int(r.pair.prompt_id[1]) % 2 for r in rows)
    dropped = {r.pair.id: {f.check for f in r.findings} for r in rows if r.dropped}
    assert dropped == {**{r.pair.id: {"non_finite"} for r in rows if r.pair.prompt_id == "u2"},
                       **{r.pair.id: {"padded_codes"} for r in rows if r.pair.target_id == "u5"}}


def prepare_args(tiny_project, tiny_models, corpus, out, **settings):
    paths = tiny_models[0]
    splits = {"train": [str(corpus["train"])], "val": [str(corpus["val"])]}
    return (splits, tiny_project.tokenizer, tiny_project.base_config, out,
            PrepareSettings(str(paths.checkpoint_dir), str(paths.w2v_bert), str(paths.codec), **settings),
            CheckSettings(max_bad_rows=0.2))


@pytest.fixture
def corpus(tiny_project, tmp_path):
    """Train: two speakers, three clips each, and a row whose audio is missing; val: two speakers, two each."""
    texts = tiny_project.am_texts
    train = [(f"u{i:02d}", texts[i], DURATIONS[i], f"s{i % 2}") for i in range(6)]
    val = [(f"v{i}", texts[6 + i], 0.8 + 0.1 * i, f"s{i % 2}") for i in range(4)]
    folder = tmp_path / "corpus"
    train_manifest, rows = write_corpus(folder, "train", train)
    with open(train_manifest, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**rows[0], "id": "u90", "audio": "wav/missing.wav"}, ensure_ascii=False) + "\n")
    return {"train": train_manifest, "val": write_corpus(folder, "val", val, seed=10)[0]}


def test_sigterm_stops_after_the_batch_and_the_same_command_finishes_the_same_dataset(tiny_project, tiny_models,
                                                                                     corpus, tmp_path):
    from fidel_tts.trainer.data.parquet import ParquetPairs

    whole = prepare(*prepare_args(tiny_project, tiny_models, corpus, tmp_path / "whole", batch_size=2, shard_size=3))
    assert whole.status == "completed", [f.text() for f in whole.report.findings]
    assert [d["check"] for d in whole.dropped] == ["missing_audio"]
    assert [d["id"] for d in whole.info["prepare"]["dropped_rows"]] == ["u90"]
    calls = []

    def sigterm_after_first_batch(done, todo):
        calls.append(done)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    args = prepare_args(tiny_project, tiny_models, corpus, tmp_path / "cut", batch_size=2, shard_size=3)
    first = prepare(*args, on_batch=sigterm_after_first_batch)
    assert first.status == "preempted" and first.clips == 2  # the batch finished, nothing after it
    assert list((tmp_path / "cut" / "shards").glob("*.partial.arrow"))
    assert not (tmp_path / "cut" / "dataset.json").exists()
    second = prepare(*args)
    assert second.status == "completed" and second.clips == 10 - 2  # the interrupted run kept its first batch
    assert second.info["content_sha256"] == whole.info["content_sha256"]
    assert prepare(*args).reused
    assert_sharded_by_rank_gives_the_same(tiny_project, tiny_models, corpus, tmp_path, whole.info["content_sha256"])
    train = ParquetPairs([second.info["splits"]["train"]["path"]], tiny_project.tokenizer)
    assert len(train) == 6 * 2 and set(train.column("speaker")) == {"s0", "s1"}
    prompts = dict(zip(train.column("pair_id"), train.column("prompt_id"), strict=True))
    assert all(pid.split("__")[1] == prompt and int(pid[1:3]) % 2 == int(prompt[1:]) % 2
               for pid, prompt in prompts.items())


def assert_sharded_by_rank_gives_the_same(tiny_project, tiny_models, corpus, tmp_path, content_sha256):
    """Two torchrun ranks (RANK/WORLD_SIZE), run one after the other: rank 1 takes the odd shards and leaves,
    rank 0 the others, waits for all and writes the dataset."""
    from unittest import mock

    args = prepare_args(tiny_project, tiny_models, corpus, tmp_path / "ranks", batch_size=2, shard_size=3)
    with mock.patch.dict(os.environ, {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}):
        assert prepare(*args).status == "shards_done"
    done = sorted(p.stem for p in (tmp_path / "ranks" / "shards").glob("*-*.json"))
    assert done == ["train-00001", "val-00000"]  # jobs train-0, train-1, train-2, val-0, val-1: every second one
    with mock.patch.dict(os.environ, {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}):
        last = prepare(*args)
    assert last.status == "completed" and last.info["content_sha256"] == content_sha256


def test_bad_inputs_stop_with_one_line_before_any_work(tiny_project, tiny_models, corpus, tmp_path, capsys):
    from fidel_tts.flows.cli import main

    paths = tiny_models[0]
    out = tmp_path / "out"
    base = ["prepare", "--train", str(corpus["train"]), "--tokenizer", str(tiny_project.tokenizer), "--config",
            str(tiny_project.base_config), "--out", str(out), "--checkpoint-dir", str(paths.checkpoint_dir),
            "--w2v-bert", str(paths.w2v_bert), "--codec", str(paths.codec)]
    bad_manifest = tmp_path / "bad.csv"
    bad_manifest.write_text("id,text,audio\nu1,ሰላም,a.wav\n", encoding="utf-8")
    twice = tmp_path / "twice.jsonl"
    twice.write_text(corpus["train"].read_text(encoding="utf-8").splitlines()[0] + "\n" +
                     corpus["train"].read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    cases = {
        "--w2v-bert": (["--w2v-bert", str(tmp_path / "nowhere")], "w2v-BERT 2.0 folder not found"),
        "--codec": (["--codec", str(tmp_path / "codec.safetensors")], "not found (codec file"),
        "model.safetensors": (["--codec", str(paths.w2v_bert / "model.safetensors")], "not the semantic codec"),
        "--batch-size": (["--batch-size", "0"], "--batch-size: must be at least 1"),
        "bad.csv": (["--train", str(bad_manifest)], "line 2: missing field(s) speaker"),
        "twice.jsonl": (["--train", str(twice)], "already at"),
    }
    for name, (extra, message) in cases.items():
        assert main(base + extra) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and (name in err or name.startswith("--")), (name, err)
    assert not out.exists()  # nothing written


def espeak_corpus(folder, texts: list[str], speakers, per_speaker: int, name: str):
    """Utterances spoken by espeak-ng as the demo corpus does (flows/demo/corpus.py)."""
    from fidel_tts.flows.demo.corpus import synthesize

    rows = []
    for s, speaker in enumerate(speakers):
        for j in range(per_speaker):
            uid = f"{name}_{speaker.name}_{j}"
            synthesize(texts[s * per_speaker + j], "am", speaker, folder / "wav" / f"{uid}.wav")
            rows.append({"id": uid, "text": texts[s * per_speaker + j], "audio": f"wav/{uid}.wav",
                         "speaker": speaker.name, "language": "am"})
    manifest = folder / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return manifest


@pytest.mark.slow
def test_the_flow_with_a_prepare_section_trains_on_espeak_audio(tiny_project, tiny_models, tmp_path, mlflow_uri):
    from fidel_tts.flows.demo.corpus import SPEAKERS
    from fidel_tts.flows.finetune import finetune

    paths = tiny_models[0]
    texts = [t for t in tiny_project.am_texts if len(t.split()) <= 5]
    train = espeak_corpus(tmp_path / "corpus", texts, SPEAKERS[:2], 4, "train")
    val = espeak_corpus(tmp_path / "corpus", texts[8:], SPEAKERS[:2], 2, "val")
    settings = tiny_project.flow_settings(tmp_path / "run", mlflow_uri, max_steps=10)
    settings.update(train_manifests=[str(train)], val_manifests=[str(val)],
                    prepare={"checkpoint_dir": str(paths.checkpoint_dir), "w2v_bert": str(paths.w2v_bert),
                             "codec": str(paths.codec), "batch_size": 4})
    summary = finetune(settings=settings)
    assert summary["status"] == "completed" and summary["step"] == 10
    info = json.loads((tmp_path / "run" / "data" / "dataset.json").read_text())
    assert info["prepare"]["utterances"] == 12 and info["splits"]["train"]["rows"] == 8 * 2
    assert (tmp_path / "run" / "reports" / "data.md").is_file()


def cli_args(tiny_project, tiny_models, corpus, out) -> list[str]:
    paths = tiny_models[0]
    return ["prepare", "--train", str(corpus["train"]), "--val", str(corpus["val"]), "--tokenizer",
            str(tiny_project.tokenizer), "--config", str(tiny_project.base_config), "--out", str(out),
            "--checkpoint-dir", str(paths.checkpoint_dir), "--w2v-bert", str(paths.w2v_bert), "--codec",
            str(paths.codec), "--max-bad-rows", "0.2"]


def test_cond_dtype_float32_stores_float32(tiny_project, tiny_models, corpus, tmp_path, capsys):
    """It crashed with "unexpected TypeError: unhashable type: 'list'" (issue 22)."""
    import pyarrow.parquet as pq
    from fidel_tts.flows.cli import main

    out = tmp_path / "f32"
    assert main(cli_args(tiny_project, tiny_models, corpus, out) + ["--cond-dtype", "float32"]) == 0, capsys.readouterr()
    schema = pq.read_schema(out / "train.parquet")
    assert str(schema.field("condition").type.value_type) == "float"


def hf_cache_layouts(tiny_models, root):
    """The tiny models copied where IndexTTS2 keeps the real ones: the hub cache layout (snapshots/<hash>/, with
    refs/main) in one checkpoint folder, index-tts's local_dir layout in another."""
    import shutil

    paths = tiny_models[0]
    layouts = {}
    for name, snapshot in (("hub", "snapshots/0123abcd/"), ("local_dir", "")):
        checkpoints = root / name / "checkpoints"
        shutil.copytree(paths.checkpoint_dir, checkpoints)
        w2v = checkpoints / "hf_cache" / "models--facebook--w2v-bert-2.0" / snapshot
        shutil.copytree(paths.w2v_bert, w2v)
        codec = checkpoints / "hf_cache" / "models--amphion--MaskGCT" / snapshot / "semantic_codec" / "model.safetensors"
        codec.parent.mkdir(parents=True)
        shutil.copy(paths.codec, codec)
        if snapshot:
            for repo in ("models--facebook--w2v-bert-2.0", "models--amphion--MaskGCT"):
                (checkpoints / "hf_cache" / repo / "refs").mkdir()
                (checkpoints / "hf_cache" / repo / "refs" / "main").write_text("0123abcd")
        layouts[name] = (checkpoints, w2v, codec)
    return layouts


def test_the_checkpoint_dir_alone_finds_w2v_bert_and_the_codec_in_hf_cache(tiny_models, tmp_path, capsys):
    from fidel_tts.flows.cli import main
    from fidel_tts.trainer.data.features import found_model_paths

    for name, (checkpoints, w2v, codec) in hf_cache_layouts(tiny_models, tmp_path).items():
        paths, found = found_model_paths(checkpoints, "", "")
        assert (paths.w2v_bert, paths.codec) == (w2v, codec), name
        assert len(found) == 2 and str(codec) in found[1], name
        assert set(paths.files()) >= {"w2v_weights", "codec"}
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    out = tmp_path / "out"
    argv = ["prepare", "--train", "m.jsonl", "--tokenizer", "t.model", "--config", "c.yaml", "--out", str(out),
            "--checkpoint-dir", str(empty / "checkpoints")]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "--w2v-bert: not given" in err[0] and "models--facebook--w2v-bert-2.0" in err[0]
    assert err[1].startswith("--codec: not given") and "semantic_codec/model.safetensors" in err[1]
    assert not out.exists()


def test_sigterm_to_the_process_group_finishes_the_batch_and_exits_75(tiny_project, tiny_models, corpus, tmp_path):
    """A preemption signals the whole group (kill -- -PGID, systemd, a machine shutting down)."""
    import subprocess
    import sys

    out = tmp_path / "group"
    argv = cli_args(tiny_project, tiny_models, corpus, out) + ["--batch-size", "2", "--shard-size", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "fidel_tts.flows.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = proc.stdout.readline()
    assert first.startswith("features: 2/"), first + proc.stderr.read()
    os.killpg(proc.pid, signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, (rest, err)
    # how many clips are done when the signal lands depends on the machine's load; the batch in hand is finished
    assert re.match(r"preempted after \d+ clips", rest.strip().splitlines()[-1]) and "Traceback" not in rest + err
    assert list((out / "shards").glob("*.arrow")) and not (out / "dataset.json").exists()  # a shard, whole or partial
