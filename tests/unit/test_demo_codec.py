import numpy as np
import pytest
import soundfile
import torch
from fidel_tts.flows.demo.codec import (
    HOP,
    N_MELS,
    SAMPLE_RATE,
    DemoCodec,
    demo_conditioning,
    fit_codec,
    log_mel,
    wav_writer,
)
from fidel_tts.trainer.errors import FidelError


def voice(f0: float, seconds: float, sr: int = SAMPLE_RATE, seed: int = 0, tilt: float = 1.0) -> np.ndarray:
    """A crude 'speaker': harmonics of f0 with a spectral tilt, under a random syllable-like envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wav = sum(np.sin(2 * np.pi * f0 * h * t) / h**tilt for h in range(1, 12))
    syllables = np.repeat(rng.uniform(0.2, 1.0, size=int(seconds * 5) + 1), sr // 5)[: t.size]
    return (0.1 * wav * syllables).astype(np.float32)


@pytest.fixture(scope="module")
def mels():
    return [log_mel(voice(f0, 1.0 + 0.3 * i, seed=i), SAMPLE_RATE) for i, f0 in enumerate((110, 180, 260))]


@pytest.mark.parametrize("sr", [16000, 22050, 24000])
def test_log_mel_is_50hz(sr):
    seconds = 1.37
    mel = log_mel(voice(150, seconds, sr=sr), sr)
    assert mel.dtype == torch.float32 and mel.shape[1] == N_MELS
    assert abs(mel.shape[0] - seconds * SAMPLE_RATE / HOP) <= 2
    assert torch.isfinite(mel).all()


def test_log_mel_accepts_tensor_and_stereo():
    wav = voice(150, 0.5)
    mono = log_mel(wav, SAMPLE_RATE)
    assert torch.equal(log_mel(torch.from_numpy(wav), SAMPLE_RATE), mono)
    assert torch.allclose(log_mel(np.stack([wav, wav], axis=1), SAMPLE_RATE), mono)


def test_kmeans_deterministic_for_seed(mels):
    a, b = fit_codec(mels, 16, seed=3), fit_codec(mels, 16, seed=3)
    assert torch.equal(a.codebook, b.codebook)
    assert a.codebook.shape == (16, N_MELS)
    assert not torch.equal(a.codebook, fit_codec(mels, 16, seed=4).codebook)


def test_kmeans_handles_empty_clusters():
    # 5 distinct frames, repeated, and k = 8: some clusters must go empty and be re-seeded
    frames = torch.arange(5, dtype=torch.float32)[:, None].repeat(40, N_MELS)
    codec = fit_codec([frames], 8, seed=0, iters=5)
    assert codec.codebook.shape == (8, N_MELS) and torch.isfinite(codec.codebook).all()
    assert len(torch.unique(codec.encode(frames))) == 5


def test_kmeans_needs_k_frames():
    with pytest.raises(FidelError):
        fit_codec([torch.zeros(3, N_MELS)], 8, seed=0)


def test_encode_decode_shapes(mels):
    codec = fit_codec(mels, 16, seed=0)
    codes = codec.encode(mels[0])
    assert codes.dtype == torch.long and codes.shape == (mels[0].shape[0],)
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    decoded = codec.decode_mel(codes)
    assert decoded.shape == mels[0].shape
    assert torch.equal(codec.encode(decoded), codes)  # centroids quantise to themselves
    assert torch.equal(codec.decode_mel(codes.numpy().astype(np.int32)), decoded)


def test_to_wav(mels):
    codec = fit_codec(mels, 16, seed=0)
    codes = codec.encode(mels[1])
    wav = codec.to_wav(codes)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - (len(codes) - 1) * HOP) <= HOP
    assert np.isfinite(wav).all() and 0 < np.abs(wav).max() <= 1.0


def test_save_load_round_trip(tmp_path, mels):
    codec = fit_codec(mels, 16, seed=0)
    codec.save(tmp_path / "codec.pt")
    loaded = DemoCodec.load(tmp_path / "codec.pt")
    assert torch.equal(loaded.codebook, codec.codebook)


def test_wav_writer_is_the_flows_render_audio_hook(tmp_path, mels):
    codec = fit_codec(mels, 16, seed=0)
    codec.save(tmp_path / "codec.pt")
    codes = [3, 3, 7, 1, 12, 12, 5]
    wav_writer(tmp_path / "codec.pt")(codes, tmp_path / "out.wav")
    audio, sr = soundfile.read(tmp_path / "out.wav")
    assert sr == SAMPLE_RATE and audio.ndim == 1 and len(audio) >= (len(codes) - 1) * HOP
    assert np.allclose(audio, codec.to_wav(codes), atol=1e-4)  # 16-bit PCM on disk


def test_load_bad_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    bad_shape = tmp_path / "bad_shape.pt"
    torch.save({"kind": "fidel-demo-codec", "codebook": torch.zeros(4, 3), "sample_rate": 16000, "hop": 320},
               bad_shape)
    for path in (garbage, foreign, bad_shape, tmp_path / "missing.pt"):
        with pytest.raises(FidelError) as err:
            DemoCodec.load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_conditioning_shapes_and_determinism(mels):
    latents, emo = demo_conditioning(mels[0], 64)
    assert latents.shape == (32, 64) and latents.dtype == np.float32
    assert emo.shape == (64,) and emo.dtype == np.float32
    again = demo_conditioning(mels[0].clone(), 64)
    assert np.array_equal(latents, again[0]) and np.array_equal(emo, again[1])
    assert 0.3 < latents.std() < 3 and 0.3 < emo.std() < 3  # roughly unit scale
    assert not np.array_equal(latents, demo_conditioning(mels[0], 64, seed=1)[0])


def test_conditioning_short_prompt():
    latents, emo = demo_conditioning(log_mel(voice(150, 0.1), SAMPLE_RATE), 16)
    assert latents.shape == (32, 16) and np.isfinite(latents).all() and np.isfinite(emo).all()


def test_conditioning_depends_on_speaker():
    def cond(f0, tilt, seed):
        latents, emo = demo_conditioning(log_mel(voice(f0, 1.5, seed=seed, tilt=tilt), SAMPLE_RATE), 64)
        return latents.mean(axis=0), emo

    a1, a2, b1 = cond(110, 1.0, seed=1), cond(110, 1.0, seed=2), cond(240, 2.0, seed=1)
    for i in range(2):  # latents, then emotion vector
        assert np.linalg.norm(a1[i] - b1[i]) > 2 * np.linalg.norm(a1[i] - a2[i])
