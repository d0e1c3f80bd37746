"""IndexTTS2 `config.yaml`: the `gpt:` fields the training path needs, read and written in upstream's format."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from fidel_tts.trainer.errors import FidelError

REQUIRED_GPT_FIELDS = (
    "model_dim", "layers", "heads", "max_text_tokens", "max_mel_tokens",
    "number_text_tokens", "number_mel_codes", "start_mel_token", "stop_mel_token",
    "start_text_token", "stop_text_token",
)


@dataclass(frozen=True)
class GPTConfig:
    model_dim: int
    layers: int
    heads: int
    max_text_tokens: int
    max_mel_tokens: int
    number_text_tokens: int
    number_mel_codes: int
    start_mel_token: int
    stop_mel_token: int
    start_text_token: int = 0
    stop_text_token: int = 1
    condition_num_latent: int = 32  # UnifiedVoice default, not in config.yaml
    max_conditioning_inputs: int = 1  # likewise

    @property
    def text_rows(self) -> int:
        """Rows of text_embedding and text_head: upstream's `number_text_tokens + 1` rule."""
        return self.number_text_tokens + 1

    @property
    def text_positions(self) -> int:
        return self.max_text_tokens + 2

    @property
    def mel_positions(self) -> int:
        return self.max_mel_tokens + 2 + self.max_conditioning_inputs

    @property
    def prefix_len(self) -> int:
        """Conditioning latents plus the two duration slots."""
        return self.condition_num_latent + 2

    def with_text_tokens(self, number_text_tokens: int) -> GPTConfig:
        return GPTConfig(**{**asdict(self), "number_text_tokens": number_text_tokens})


def read_yaml(path: str | Path, what: str):
    """A YAML file's content, or one line naming the file: `what` ("config file", "run file") not found,
    not valid YAML, or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FidelError(path, f"{what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FidelError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from exc
    except OSError as exc:
        raise FidelError(path, f"cannot read the {what} ({exc.strerror or exc})") from exc


def read_config_yaml(path: str | Path) -> dict:
    raw = read_yaml(path, "config file")
    if not isinstance(raw, dict) or not isinstance(raw.get("gpt"), dict):
        raise FidelError(path, "no `gpt:` section: not an IndexTTS2 config.yaml")
    return raw


def gpt_config_from_dict(gpt: dict, path: str | Path | None = None) -> GPTConfig:
    missing = [k for k in REQUIRED_GPT_FIELDS if k not in gpt]
    if missing:
        raise FidelError(path, f"gpt section lacks {', '.join(missing)}")
    values = {}
    for name in REQUIRED_GPT_FIELDS:
        value = gpt[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FidelError(path, f"gpt.{name} must be a non-negative integer, got {value!r}")
        values[name] = value
    if values["model_dim"] % values["heads"]:
        raise FidelError(path, f"gpt.model_dim {values['model_dim']} is not divisible by gpt.heads {values['heads']}")
    return GPTConfig(**values)


def load_gpt_config(path: str | Path) -> GPTConfig:
    return gpt_config_from_dict(read_config_yaml(path)["gpt"], path)


def write_config_yaml(raw: dict, path: str | Path, number_text_tokens: int | None = None) -> Path:
    """Write a config.yaml in upstream's layout, optionally with `gpt.number_text_tokens` updated."""
    raw = {**raw, "gpt": dict(raw["gpt"])}
    if number_text_tokens is not None:
        raw["gpt"]["number_text_tokens"] = int(number_text_tokens)
    path = Path(path)
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
