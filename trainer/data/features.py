"""Audio to the features IndexTTS2 trains on, with upstream's own modules and math (indextts2-inference).

- w2v-BERT 2.0 (`transformers` Wav2Vec2BertModel + SeamlessM4TFeatureExtractor): hidden state 17, normalised
  with the checkpoint's wav2vec2bert_stats.pt (mean, sqrt(var)), as `IndexTTS2.get_emb`;
- the MaskGCT semantic codec (RepCodec, `build_semantic_codec`) quantises it into 50 Hz codes;
- the base gpt.pth's conformer + perceiver give the prompt conditioning [32, D] (`get_conditioning`) and the
  emotion vector [D] (`get_emovec`).

Batches are padded for w2v-BERT only: its attention is masked and its convolution causal, so the real frames of
a clip do not see the padding. The codec and the conformers are not masked (non-causal convolutions, 2×
subsampling), so each clip runs through them at its own length, the frames it has when run alone, exactly as
upstream runs one prompt. That is the fix of the community's batched preprocessing, which kept the padded tail.

Weights load from local paths only; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.model.config import read_config_yaml, write_config_yaml
from fidel_tts.trainer.model.weights import first_line, read_state_dict, torch_load

SAMPLE_RATE = 16000
HIDDEN_LAYER = 17  # upstream's get_emb: hidden_states[17]
SPEAKER_RATE = 22050  # librosa.load's default, where infer_v2 reads the speaker prompt
PROMPT_SECONDS = 15  # infer_v2 cuts both prompts here
BUCKET_SPREAD = 1.25  # a w2v-BERT batch's longest wave at most this × its shortest: little padding
FEATURE_DIM = 1024  # w2v-BERT 2.0 width; UnifiedVoice's conformers take exactly this
CONDITIONING_PREFIXES = ("conditioning_encoder.", "perceiver_encoder.", "emo_conditioning_encoder.",
                         "emo_perceiver_encoder.", "emovec_layer.", "emo_layer.")
W2V_FILES = ("config.json", "preprocessor_config.json")
# where IndexTTS2 keeps the two models (checkpoints/hf_cache): folder, file inside it, the flag that overrides it
HF_CACHE_MODELS = {"w2v_bert": ("models--facebook--w2v-bert-2.0", "config.json", "--w2v-bert"),
                   "codec": ("models--amphion--MaskGCT", "semantic_codec/model.safetensors", "--codec")}


# ----------------------------------------------------------------------------- audio

@dataclass(frozen=True)
class AudioLimits:
    min_seconds: float = 0.5
    max_seconds: float = 20.0
    silence_dbfs: float = -60.0  # RMS below this: silent
    max_clipped: float = 0.001  # share of samples at full scale above this: clipped


@dataclass
class ClipAudio:
    """A clip as IndexTTS2's inference reads a prompt file (infer_v2 `_load_and_cut_audio`), all at 16 kHz."""

    speaker: np.ndarray  # librosa at 22.05 kHz, then torchaudio's Resample to 16 kHz: codes and duration
    speaker_prompt: np.ndarray  # the same, cut at 15 s at 22.05 kHz before resampling: the conditioning
    emotion: np.ndarray  # librosa at 16 kHz, cut at 15 s: the emotion vector

    @property
    def seconds(self) -> float:
        return len(self.speaker) / SAMPLE_RATE


def wav_truncation(path: Path) -> str | None:
    """Why a RIFF/WAVE file's data chunk is shorter than its header says, else None: libsndfile reads such a
    file as a shorter clip without an error, and the transcript would then speak past its end."""
    with open(path, "rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while chunk := handle.read(8):
            if len(chunk) < 8:
                return None
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                left = path.stat().st_size - handle.tell()
                streamed = size in (0, 0xFFFFFFFF)  # written without a final size: nothing to compare
                return None if streamed or left >= size else f"data chunk holds {left} of the {size} bytes " \
                                                             "its header declares (cut off)"
            handle.seek(size + (size & 1), 1)
    return None


def read_audio(path: Path, limits: AudioLimits) -> tuple[ClipAudio | None, tuple[str, str] | None]:
    """(the clip, None) or (None, (problem, detail)): checked on the file's samples, then read as inference does."""
    import soundfile

    if not path.is_file():
        return None, ("missing_audio", f"{path} not found")
    try:
        truncated = wav_truncation(path)
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, soundfile.LibsndfileError) as exc:
        return None, ("unreadable_audio", f"{path.name}: {first_line(exc)}")
    if truncated:
        return None, ("truncated_audio", f"{path.name}: {truncated}")
    seconds = len(samples) / rate
    if seconds < limits.min_seconds or seconds > limits.max_seconds:
        return None, ("duration", f"{seconds:.2f} s, outside {limits.min_seconds}..{limits.max_seconds} s")
    clipped = float((np.abs(samples) >= 0.999).mean())
    if clipped > limits.max_clipped:
        return None, ("clipped", f"{clipped:.2%} of samples at full scale (max {limits.max_clipped:.2%})")
    clip = prompt_audio(path)
    rms = float(np.sqrt(np.square(clip.emotion, dtype=np.float64).mean()))
    dbfs = 20 * np.log10(max(rms, 1e-10))
    if dbfs < limits.silence_dbfs:
        return None, ("silent", f"RMS {dbfs:.1f} dBFS < {limits.silence_dbfs} dBFS")
    return clip, None


def prompt_audio(path: Path) -> ClipAudio:
    """infer_v2's readers: `_get_speaker_conditioning` (librosa.load at its default 22.05 kHz, cut, torchaudio
    Resample to 16 kHz) and `_get_emotion_conditioning` (librosa.load at 16 kHz, cut)."""
    import librosa
    import torchaudio

    to_16k = torchaudio.transforms.Resample(SPEAKER_RATE, SAMPLE_RATE)
    at_22k, _ = librosa.load(str(path), sr=SPEAKER_RATE)
    speaker = to_16k(torch.from_numpy(at_22k).unsqueeze(0))[0].numpy()
    cut = int(PROMPT_SECONDS * SPEAKER_RATE)
    prompt = speaker if len(at_22k) <= cut else to_16k(torch.from_numpy(at_22k[:cut]).unsqueeze(0))[0].numpy()
    at_16k, _ = librosa.load(str(path), sr=SAMPLE_RATE)
    return ClipAudio(speaker, prompt, at_16k[:int(PROMPT_SECONDS * SAMPLE_RATE)])


# ----------------------------------------------------------------------------- the models

@dataclass
class ModelPaths:
    """Where the real (or stand-in) weights are: nothing else is read."""

    checkpoint_dir: Path  # IndexTTS2 folder: config.yaml, gpt.pth, wav2vec2bert_stats.pt
    w2v_bert: Path  # facebook/w2v-bert-2.0 folder: config.json, preprocessor_config.json, model.safetensors
    codec: Path  # amphion/MaskGCT semantic_codec/model.safetensors

    def files(self) -> dict[str, Path]:
        """Every file loaded; FidelError naming the first one missing."""
        config = self.checkpoint_dir / "config.yaml"
        if not self.checkpoint_dir.is_dir():
            raise FidelError(self.checkpoint_dir, "IndexTTS2 checkpoint folder not found (config.yaml, gpt.pth, "
                                                  "wav2vec2bert_stats.pt)")
        raw = read_config_yaml(config)
        files = {"config": config, "gpt": self.checkpoint_dir / raw.get("gpt_checkpoint", "gpt.pth"),
                 "stats": self.checkpoint_dir / raw.get("w2v_stat", "wav2vec2bert_stats.pt")}
        if not isinstance(raw.get("semantic_codec"), dict):
            raise FidelError(config, "no `semantic_codec:` section: not an IndexTTS2 config.yaml")
        if not self.w2v_bert.is_dir():
            raise FidelError(self.w2v_bert, "w2v-BERT 2.0 folder not found (facebook/w2v-bert-2.0: config.json, "
                                            "preprocessor_config.json, model.safetensors)")
        files.update({name: self.w2v_bert / name for name in W2V_FILES})
        weights = [self.w2v_bert / n for n in ("model.safetensors", "pytorch_model.bin")]
        files["w2v_weights"] = next((w for w in weights if w.is_file()), weights[0])
        files["codec"] = self.codec
        for name, path in files.items():
            if not path.is_file():
                raise FidelError(path, f"not found ({name} file for fidel prepare)")
        return files


def in_hf_cache(checkpoint_dir: Path, repo: str, inner: str) -> Path | None:
    """`inner` of a model under checkpoint_dir/hf_cache/<repo>: at its root (index-tts's `local_dir` downloads) or in
    the hub layout's snapshots/<hash>/ (refs/main's snapshot first)."""
    root = checkpoint_dir / "hf_cache" / repo
    ref = root / "refs" / "main"
    snapshots = [root / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    snapshots += sorted((root / "snapshots").glob("*"))
    return next((folder / inner for folder in [root, *snapshots] if (folder / inner).is_file()), None)


def found_model_paths(checkpoint_dir: Path, w2v_bert: str, codec: str) -> tuple[ModelPaths, list[str]]:
    """The w2v-BERT folder and codec file given, else found in checkpoint_dir/hf_cache: (the paths, a line per
    model found there); FidelError with a line per model neither given nor found."""
    paths, found, missing = {"w2v_bert": w2v_bert, "codec": codec}, [], []
    for name, given in list(paths.items()):
        if given:
            paths[name] = Path(given)
            continue
        repo, inner, flag = HF_CACHE_MODELS[name]
        hit = in_hf_cache(checkpoint_dir, repo, inner)
        if hit is None:
            missing.append(f"{flag}: not given, and {checkpoint_dir / 'hf_cache' / repo} has no {inner} (at its "
                           f"root or in snapshots/<hash>/)")
            continue
        paths[name] = hit.parent if name == "w2v_bert" else hit
        found.append(f"{flag} {paths[name]} (found in {checkpoint_dir / 'hf_cache'})")
    if missing:
        raise FidelError(None, "\n".join(missing))
    return ModelPaths(checkpoint_dir, paths["w2v_bert"], paths["codec"]), found


def require_upstream() -> None:
    """fidel prepare runs upstream's own modules: say how to install them instead of an ImportError."""
    try:
        import indextts.gpt.model_v2  # noqa: F401
        import indextts.utils.maskgct_utils  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise FidelError(None, f"fidel prepare needs indextts2-inference and transformers ({exc}): "
                               "pip install -e '.[prepare]'") from None


@dataclass
class FeatureModels:
    extractor: object  # SeamlessM4TFeatureExtractor
    w2v: torch.nn.Module  # Wav2Vec2BertModel
    mean: torch.Tensor
    std: torch.Tensor
    codec: torch.nn.Module  # RepCodec
    gpt: torch.nn.Module  # upstream UnifiedVoice: only its conditioning modules are used
    device: torch.device

    @property
    def model_dim(self) -> int:
        return self.gpt.model_dim

    @classmethod
    def load(cls, paths: ModelPaths, device: torch.device) -> FeatureModels:
        quiet_transformers()
        files = paths.files()
        raw = read_config_yaml(files["config"])
        extractor, w2v = load_w2v_bert(paths.w2v_bert)
        stats = torch_load(files["stats"])
        if not isinstance(stats, dict) or not {"mean", "var"} <= set(stats):
            raise FidelError(files["stats"], "not a w2v-BERT stats file (a dict with 'mean' and 'var')")
        codec = load_codec(raw["semantic_codec"], files["codec"])
        gpt = load_conditioning_gpt(raw["gpt"], files["gpt"])
        return cls(extractor, w2v.to(device), stats["mean"].float().to(device),
                   torch.sqrt(stats["var"].float()).to(device), codec.to(device), gpt.to(device), device)


def quiet_transformers() -> None:
    """No progress bars, and no warnings about GPT-2 token ids the conditioning path never uses."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_w2v_bert(folder: Path):
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertModel

    try:
        extractor = SeamlessM4TFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        model = Wav2Vec2BertModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FidelError(folder, f"not a loadable w2v-BERT 2.0 folder ({first_line(exc)})") from None
    if model.config.hidden_size != FEATURE_DIM or model.config.num_hidden_layers < HIDDEN_LAYER:
        raise FidelError(folder, f"w2v-BERT has width {model.config.hidden_size} and {model.config.num_hidden_layers} "
                                 f"layers; IndexTTS2 reads layer {HIDDEN_LAYER} of a {FEATURE_DIM}-wide model")
    return extractor, up_to_layer(model.float().eval(), HIDDEN_LAYER)  # fp32 as upstream runs it


def up_to_layer(model, layer: int):
    """The model without the encoder layers after `layer`: hidden_states[layer] is the same, the rest is never
    read (for w2v-BERT 2.0, 7 of its 24 layers)."""
    model.encoder.layers = model.encoder.layers[:layer]
    return model


def load_codec(section: dict, path: Path) -> torch.nn.Module:
    import safetensors.torch
    from indextts.utils.maskgct_utils import build_semantic_codec
    from omegaconf import OmegaConf

    codec = build_semantic_codec(OmegaConf.create(section))
    try:
        safetensors.torch.load_model(codec, str(path))
    except (RuntimeError, OSError, ValueError) as exc:
        raise FidelError(path, f"not the semantic codec of config.yaml's semantic_codec section ({first_line(exc)})"
                         ) from None
    return codec.eval()


def check_codec(section: dict, path: Path) -> None:
    """The codec file holds the tensors of config.yaml's codec, by the names and shapes in its header: a wrong file
    (the w2v-BERT weights, say) is refused before anything is written, not when the models load."""
    from indextts.utils.maskgct_utils import build_semantic_codec
    from omegaconf import OmegaConf
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as weights:
            found = {k: list(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise FidelError(path, f"not a safetensors file ({first_line(exc)})") from None
    with torch.device("meta"):
        wanted = {k: list(v.shape) for k, v in build_semantic_codec(OmegaConf.create(section)).state_dict().items()}
    wrong = next((k for k in wanted if found.get(k) != wanted[k]), None)
    if wrong is not None or len(found) != len(wanted):
        detail = f"{wrong}: {found.get(wrong, 'absent')}, expected {wanted[wrong]}" if wrong else "extra tensors"
        raise FidelError(path, f"not the semantic codec of config.yaml's semantic_codec section ({detail})")


def load_conditioning_gpt(section: dict, path: Path) -> torch.nn.Module:
    """Upstream UnifiedVoice with the base gpt.pth's conditioning modules loaded (the rest is never used)."""
    from indextts.gpt.model_v2 import UnifiedVoice

    try:
        gpt = UnifiedVoice(**section)
    except (TypeError, KeyError, ValueError) as exc:
        raise FidelError(path.parent / "config.yaml", f"gpt section does not build UnifiedVoice ({first_line(exc)})"
                         ) from None
    state = read_state_dict(path)
    wanted = [k for k in gpt.state_dict() if k.startswith(CONDITIONING_PREFIXES)]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise FidelError(path, f"lacks {len(missing)} conditioning tensor(s) (e.g. {missing[0]}): prepare needs the "
                               "base IndexTTS2 gpt.pth with its conformers and perceivers")
    try:
        gpt.load_state_dict({k: state[k] for k in wanted}, strict=False)
    except RuntimeError as exc:
        raise FidelError(path, f"conditioning weights do not fit config.yaml's gpt section ({first_line(exc)})"
                         ) from None
    return gpt.eval()


# ----------------------------------------------------------------------------- the math

@dataclass
class ClipFeatures:
    codes: np.ndarray  # int64 [frames]
    condition: np.ndarray  # float32 [32, D]
    emo_vec: np.ndarray  # float32 [D]


def semantic_embedding(models: FeatureModels, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """upstream IndexTTS2.get_emb: w2v-BERT hidden state 17, normalised."""
    out = models.w2v(input_features=features, attention_mask=mask, output_hidden_states=True)
    return (out.hidden_states[HIDDEN_LAYER] - models.mean) / models.std


def length_buckets(lengths: list[int]) -> list[list[int]]:
    """Indices sorted by length, cut wherever a wave would exceed BUCKET_SPREAD × its bucket's shortest."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if not buckets or lengths[i] > BUCKET_SPREAD * lengths[buckets[-1][0]]:
            buckets.append([])
        buckets[-1].append(i)
    return buckets


def embeddings(models: FeatureModels, waves: list[np.ndarray]) -> list[torch.Tensor]:
    """Each 16 kHz wave's [1, frames, 1024] embedding at its own frame count, in length-bucketed w2v-BERT batches."""
    alone = [models.extractor(w, sampling_rate=SAMPLE_RATE, return_tensors="pt") for w in waves]
    frames = [x["input_features"].shape[1] for x in alone]  # upstream's frame count for the wave alone
    pad = torch.nn.utils.rnn.pad_sequence
    out: list[torch.Tensor | None] = [None] * len(waves)
    for bucket in length_buckets(frames):
        features = pad([alone[i]["input_features"][0] for i in bucket], batch_first=True,
                       padding_value=models.extractor.padding_value)
        mask = pad([alone[i]["attention_mask"][0] for i in bucket], batch_first=True)
        batch = semantic_embedding(models, features.to(models.device), mask.to(models.device))
        for row, i in enumerate(bucket):
            out[i] = batch[row:row + 1, :frames[i]]
    return out


@torch.inference_mode()
def clip_features(models: FeatureModels, clips: list[ClipAudio]) -> list[ClipFeatures]:
    """Codes of each clip's speaker path, conditioning of its cut speaker prompt, emotion vector of its emotion
    path; w2v-BERT batched, the codec and conformers (not masked) at each wave's own length, as upstream."""
    waves, slots = distinct_waves(clips)
    embedded = embeddings(models, waves)
    return [own_length_features(models, *(embedded[k] for k in slot)) for slot in slots]


def distinct_waves(clips: list[ClipAudio]) -> tuple[list[np.ndarray], list[list[int]]]:
    """The waves to embed (a clip's speaker prompt is its speaker wave when not cut) and each clip's three indices."""
    waves: list[np.ndarray] = []
    slots = []
    for clip in clips:
        first, slot = len(waves), []
        for part in (clip.speaker, clip.speaker_prompt, clip.emotion):
            same = next((k for k in range(first, len(waves)) if waves[k] is part), None)
            if same is None:
                waves.append(part)
                same = len(waves) - 1
            slot.append(same)
        slots.append(slot)
    return waves, slots


def own_length_features(models: FeatureModels, speaker: torch.Tensor, prompt: torch.Tensor,
                        emotion: torch.Tensor) -> ClipFeatures:
    def lengths(embedding: torch.Tensor) -> torch.Tensor:
        return torch.tensor([embedding.shape[1]], device=embedding.device)

    codes, _ = models.codec.quantize(speaker)
    condition = models.gpt.get_conditioning(prompt.transpose(1, 2), lengths(prompt))
    emo_vec = models.gpt.get_emovec(emotion, lengths(emotion))
    return ClipFeatures(codes.reshape(-1).cpu().numpy().astype(np.int64), condition[0].float().cpu().numpy(),
                        emo_vec[0].float().cpu().numpy())


# ----------------------------------------------------------------------------- stand-ins for tests and demos

def tiny_gpt_section(model_dim: int, codebook: int, number_text_tokens: int = 100) -> dict:
    """A small upstream UnifiedVoice (conformer_perceiver), built from the same classes as the real one."""
    module = {"output_size": 32, "linear_units": 64, "attention_heads": 2, "num_blocks": 1, "input_layer": "conv2d2",
              "perceiver_mult": 2}
    return {"model_dim": model_dim, "layers": 1, "heads": 2, "max_text_tokens": 80, "max_mel_tokens": 300,
            "max_conditioning_inputs": 1, "mel_length_compression": 1024, "number_text_tokens": number_text_tokens,
            "number_mel_codes": codebook + 2, "start_mel_token": codebook, "stop_mel_token": codebook + 1,
            "start_text_token": 0, "stop_text_token": 1, "train_solo_embeddings": False,
            "use_mel_codes_as_input": True, "condition_type": "conformer_perceiver", "condition_module": module,
            "emo_condition_module": dict(module)}


def write_tiny_models(folder: Path, model_dim: int, codebook: int, seed: int = 0) -> ModelPaths:
    """Random-weight stand-ins of the three real models, saved as the real ones are laid out."""
    import safetensors.torch
    from indextts.gpt.model_v2 import UnifiedVoice
    from indextts.utils.maskgct_utils import build_semantic_codec
    from omegaconf import OmegaConf
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    quiet_transformers()
    paths = ModelPaths(folder / "checkpoints", folder / "w2v-bert-2.0", folder / "semantic_codec.safetensors")
    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    w2v = Wav2Vec2BertModel(Wav2Vec2BertConfig(hidden_size=FEATURE_DIM, num_hidden_layers=HIDDEN_LAYER,
                                               num_attention_heads=4, intermediate_size=64,
                                               conv_depthwise_kernel_size=5))
    w2v.save_pretrained(str(paths.w2v_bert))
    SeamlessM4TFeatureExtractor().save_pretrained(str(paths.w2v_bert))
    codec_section = {"codebook_size": codebook, "hidden_size": FEATURE_DIM, "codebook_dim": 8, "vocos_dim": 32,
                     "vocos_intermediate_dim": 64, "vocos_num_layers": 1}
    codec = build_semantic_codec(OmegaConf.create(codec_section))
    safetensors.torch.save_model(codec, str(paths.codec))
    gpt_section = tiny_gpt_section(model_dim, codebook)
    torch.save(UnifiedVoice(**gpt_section).state_dict(), paths.checkpoint_dir / "gpt.pth")
    torch.save({"mean": torch.randn(FEATURE_DIM) * 0.1, "var": torch.rand(FEATURE_DIM) + 0.5},
               paths.checkpoint_dir / "wav2vec2bert_stats.pt")
    write_config_yaml({"gpt": gpt_section, "semantic_codec": codec_section, "w2v_stat": "wav2vec2bert_stats.pt",
                       "gpt_checkpoint": "gpt.pth", "version": "2.0"}, paths.checkpoint_dir / "config.yaml")
    return paths
