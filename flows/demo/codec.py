"""A demo stand-in for IndexTTS2's semantic codec and its conditioning encoders.

IndexTTS2 turns audio into 50 Hz ids with a MaskGCT RepCodec over w2v-BERT features, and into
conditioning with frozen conformer-perceiver encoders. Neither ships here, so the demo uses:

- codes: a k-means codebook over 80-bin log-mel frames at 16 kHz with a 320-sample hop (50 Hz);
- conditioning: the prompt's log-mel, pooled to 32 frames and projected by a fixed random matrix.

They have the right shapes, rates and dtypes, and they depend on the audio (codes on its content,
conditioning on its speaker), which is all a GPT fine-tuning demo needs. They are not learned
representations and carry no semantics of the real models.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio
from fidel_tts.trainer.errors import FidelError

SAMPLE_RATE = 16000
HOP = 320  # 16000 / 320 = 50 frames per second, the rate of IndexTTS2's semantic codes
N_MELS = 80
N_FFT = 1024
WIN = 640
LOG_FLOOR = 1e-5
CONDITION_LATENTS = 32


@lru_cache(maxsize=1)
def _mel_transform() -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=N_FFT, win_length=WIN, hop_length=HOP,
        f_min=0.0, f_max=SAMPLE_RATE / 2, n_mels=N_MELS, power=2.0, center=True,
    )


def log_mel(wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
    """Log-mel frames [T, N_MELS] at 50 Hz of a mono waveform (T = len_16k // HOP + 1)."""
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32) if isinstance(wav, np.ndarray) else wav)
    x = x.to(torch.float32)
    if x.dim() == 2:  # [T, C] from soundfile: mix down
        x = x.mean(dim=1)
    if sr != SAMPLE_RATE:
        x = torchaudio.functional.resample(x, sr, SAMPLE_RATE)
    with torch.no_grad():
        mel = _mel_transform()(x)  # [N_MELS, T]
    return torch.log(mel.clamp(min=LOG_FLOOR)).T.contiguous()


@dataclass
class DemoCodec:
    """Nearest-centroid quantiser of log-mel frames; ids 0..K-1 stand in for semantic codes."""

    codebook: torch.Tensor  # [K, N_MELS] log-mel centroids

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """[T, N_MELS] log-mel -> LongTensor [T] of codebook ids."""
        return _nearest(mel.to(torch.float32), self.codebook)

    def decode_mel(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[T] ids -> [T, N_MELS] centroid log-mel."""
        ids = torch.as_tensor(np.asarray(codes, dtype=np.int64) if isinstance(codes, np.ndarray) else codes)
        return self.codebook[ids.long()]

    def to_wav(self, codes: torch.Tensor | np.ndarray, n_iter: int = 24) -> np.ndarray:
        """Rough 16 kHz waveform of the codes (Griffin-Lim: robotic, but audible and fast)."""
        power_mel = self.decode_mel(codes).exp().T  # [N_MELS, T]
        with torch.no_grad():
            spec = _inverse_mel()(power_mel)
            wav = _griffin_lim(n_iter)(spec)
        wav = wav.numpy().astype(np.float32)
        peak = float(np.abs(wav).max()) if wav.size else 0.0
        return wav / peak * 0.9 if peak > 0 else wav

    def save(self, path: str | Path) -> None:
        torch.save({"kind": "fidel-demo-codec", "codebook": self.codebook.clone(),
                    "sample_rate": SAMPLE_RATE, "hop": HOP, "n_mels": N_MELS}, path)

    @staticmethod
    def load(path: str | Path) -> DemoCodec:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise FidelError(path, f"not a readable demo codec ({type(e).__name__})") from e
        if not isinstance(blob, dict) or blob.get("kind") != "fidel-demo-codec":
            raise FidelError(path, "not a demo codec file (missing kind 'fidel-demo-codec')")
        codebook = blob.get("codebook")
        if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or codebook.shape[1] != N_MELS:
            raise FidelError(path, f"demo codec codebook must be a [K, {N_MELS}] tensor")
        if blob.get("hop") != HOP or blob.get("sample_rate") != SAMPLE_RATE:
            raise FidelError(path, "demo codec was made with a different sample rate or hop")
        return DemoCodec(codebook=codebook.to(torch.float32))


@lru_cache(maxsize=1)
def _inverse_mel() -> torchaudio.transforms.InverseMelScale:
    return torchaudio.transforms.InverseMelScale(
        n_stft=N_FFT // 2 + 1, n_mels=N_MELS, sample_rate=SAMPLE_RATE, f_min=0.0, f_max=SAMPLE_RATE / 2)


@lru_cache(maxsize=4)
def _griffin_lim(n_iter: int) -> torchaudio.transforms.GriffinLim:
    return torchaudio.transforms.GriffinLim(
        n_fft=N_FFT, n_iter=n_iter, win_length=WIN, hop_length=HOP, power=2.0, rand_init=False)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    # ||x - c||^2 without the ||x||^2 term, which does not change the argmin
    scores = (centroids * centroids).sum(dim=1)[None, :] - 2.0 * (x @ centroids.T)
    return scores.argmin(dim=1)


def _kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    first = torch.randint(len(x), (1,), generator=gen).item()
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct frames than k: pick any
            idx = torch.randint(len(x), (1,), generator=gen).item()
        else:
            idx = torch.multinomial(d2 / total, 1, generator=gen).item()
        centroids.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(dim=1))
    return torch.stack(centroids)


def fit_codec(mels: list[torch.Tensor], k: int, seed: int, iters: int = 25) -> DemoCodec:
    """K-means (k-means++ init) over all frames of `mels`; the same frames and seed give the same codebook."""
    frames = torch.cat([m.to(torch.float32) for m in mels], dim=0) if mels else torch.empty(0, N_MELS)
    if len(frames) < k:
        raise FidelError(None, f"k-means needs at least k={k} frames, got {len(frames)}")
    gen = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp_init(frames, k, gen)
    for _ in range(iters):
        assign = _nearest(frames, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, frames)
        counts = torch.bincount(assign, minlength=k).to(frames.dtype)
        new = sums / counts.clamp(min=1)[:, None]
        empty = counts == 0
        if empty.any():
            # Re-seed empty clusters on the frames that are worst served by their centroid.
            err = ((frames - centroids[assign]) ** 2).sum(dim=1)
            new[empty] = frames[err.topk(int(empty.sum())).indices]
        if torch.equal(new, centroids):
            break
        centroids = new
    return DemoCodec(codebook=centroids.contiguous())


def _projection(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / rows**0.5


def _standardise(x: torch.Tensor, dim: int) -> torch.Tensor:
    return (x - x.mean(dim=dim, keepdim=True)) / (x.std(dim=dim, keepdim=True) + 1e-6)


def demo_conditioning(prompt_mel: torch.Tensor, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for the frozen conditioning encoders: ([32, dim] latents, [dim] emotion vector), float32.

    Latents: the prompt log-mel pooled over time into 32 frames, each frame standardised over its
    bins (keeps spectral shape, i.e. pitch and timbre, drops loudness), then projected by a fixed
    seeded random matrix. Emotion vector: per-bin mean and std over the utterance of those
    standardised frames, projected by a second fixed matrix. Both have roughly unit variance.

    What they do not do: they are not learned, not speaker-invariant to content, and carry no emotion;
    they only make the GPT's conditioning depend deterministically on the prompt's voice.
    """
    if prompt_mel.dim() != 2 or prompt_mel.shape[1] != N_MELS or prompt_mel.shape[0] < 1:
        raise ValueError(f"prompt_mel must be [T>=1, {N_MELS}], got {tuple(prompt_mel.shape)}")
    mel = prompt_mel.to(torch.float64)
    # float64 throughout so the result does not depend on thread count or kernel choice.
    pooled = F.adaptive_avg_pool1d(mel.T[None], CONDITION_LATENTS)[0].T  # [32, N_MELS]
    latents = _standardise(pooled, dim=1) @ _projection(N_MELS, dim, seed)
    shapes = _standardise(mel, dim=1)  # per-frame spectral shape, loudness removed
    stats = torch.cat([shapes.mean(dim=0), shapes.std(dim=0, correction=0)])
    emo = stats @ _projection(2 * N_MELS, dim, seed + 1)
    return latents.to(torch.float32).numpy(), emo.to(torch.float32).numpy()


def wav_writer(codec_path: Path):
    """The finetune flow's render_audio hook: decoded codes to a .wav through this codec."""

    def write_wav(codes: list[int], wav: Path) -> None:
        soundfile.write(wav, DemoCodec.load(codec_path).to_wav(codes), SAMPLE_RATE)

    return write_wav
