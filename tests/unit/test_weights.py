"""Loading base checkpoints: every community format, what upstream drops, B from the checkpoint, refusals that
name the keys, pass-through tensors unchanged, and unsafe pickles refused even beside an allowed numpy array."""

import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.hashing import file_sha256
from fidel_tts.trainer.model.config import gpt_config_from_dict
from fidel_tts.trainer.model.weights import (
    load_base_checkpoint,
    read_state_dict,
    same_bytes,
    torch_load,
    upstream_layout,
)

from tests.fixtures.layout_fixture import RELEASE_GPT, SMALL_CONDITIONING, layout_state_dict
from tests.fixtures.synthetic import tiny_config_dict

DATA = Path(__file__).resolve().parents[1] / "data"


def small_gpt(tokens: int = 50) -> dict:
    return {**tiny_config_dict(tokens)["gpt"], **SMALL_CONDITIONING}


@pytest.fixture(scope="module")
def small_state():
    return layout_state_dict(small_gpt(), seed=0)


def load(path, gpt=None):
    gpt = gpt or small_gpt()
    return load_base_checkpoint(path, gpt_config_from_dict(gpt), gpt)


def adamw_state(state: dict) -> dict:
    """A real AdamW state_dict over the training-path tensors, as the community trainers save it (int ids)."""
    params = [torch.nn.Parameter(v.clone()) for k, v in state.items() if k.startswith(("text_", "mel_", "gpt."))]
    opt = torch.optim.AdamW(params, lr=1e-5)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def scheduler_state(opt_state: dict) -> dict:
    return {"base_lrs": [1e-5], "last_epoch": 7, "_step_count": 8, "_is_initial": False,
            "_get_lr_called_within_step": False, "_last_lr": [1e-5], "lr_lambdas": [{}]}


def community_checkpoints(state: dict) -> dict[str, dict]:
    """The community trainers' files (docs/design.md §8), with the model state_dict inside."""
    opt = adamw_state(state)
    manifests = {"train": [{"path": "train.jsonl", "count": 10, "languages": ["am"]}], "val": []}
    np_state = np.random.get_state()
    return {
        "amv2_model_step": {"model": state, "optimizer": opt, "scheduler": scheduler_state(opt), "scaler": None,
                            "epoch": 1, "step": 8, "batch_idx": 3, "recent_checkpoints": ["model_step8.pth"],
                            "accumulation_counter": 1,
                            "extra": {"type": "step", "manifests": manifests, "tokenizer": "bpe.model",
                                      "amp_dtype": "bfloat16"},
                            "last_losses": {"text_loss": 2.5, "mel_loss": 4.0, "mel_top1": 0.2}},
        "amv2_latest": {"model": state, "optimizer": opt, "scheduler": scheduler_state(opt),
                        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                   "growth_interval": 2000, "_growth_tracker": 5},
                        "epoch": 1, "step": 8, "batch_idx": 3, "recent_checkpoints": [], "manifests": manifests,
                        "rng_state": {"torch_cpu": torch.get_rng_state(), "torch_cuda": None,
                                      "numpy": np_state, "python": random.getstate()},
                        "batch_size": 4, "grad_accumulation": 2, "pytorch_version": "2.8.0",
                        "cuda_version": None, "cuda_peak_memory": 0},
        "jarodmica_latest": {"model": state, "optimizer": opt, "scheduler": scheduler_state(opt), "scaler": None,
                             "epoch": 0, "step": 8, "recent_checkpoints": [], "manifests": manifests},
        "ksuriuri_model_step": {"model": state},
        "instavar": {"model": state, "optimizer": opt, "scheduler": scheduler_state(opt), "scaler": None,
                     "rng_state": {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state(),
                                   "cuda": None}, "epoch": 0, "step": 8, "recent_checkpoints": []},
        "plain": state,
    }


def test_layout_from_config_is_the_reference_key_list():
    """The formula in weights.upstream_layout, at the release config, is upstream's state_dict key for key."""
    reference = json.loads((DATA / "indextts2_gpt_state_dict.json").read_text())
    assert reference["config_used"] == RELEASE_GPT
    layout = upstream_layout(gpt_config_from_dict(RELEASE_GPT), RELEASE_GPT)
    assert list(layout.items()) == [(k["name"], tuple(k["shape"])) for k in reference["keys"]]
    assert sum(int(np.prod(s)) for s in layout.values()) == reference["total_params"] == 871_100_639
    at_24k = upstream_layout(gpt_config_from_dict({**RELEASE_GPT, "number_text_tokens": 24000}), RELEASE_GPT)
    assert sum(int(np.prod(s)) for s in at_24k.values()) == 901_832_639  # docs/design.md §8
    assert [k for k in layout if layout[k] != at_24k[k]] == ["text_embedding.weight", "text_head.weight",
                                                              "text_head.bias"]


def test_vendored_assets_match_their_recorded_sha256():
    recorded = dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|", (DATA / "README.md").read_text(), re.M))
    assert set(recorded) == {"bpe.model", "indextts2_gpt_state_dict.json"}
    assert {name: file_sha256(DATA / name) for name in recorded} == recorded


@pytest.mark.parametrize("kind", ["plain", "amv2_model_step", "amv2_latest", "jarodmica_latest",
                                  "ksuriuri_model_step", "instavar"])
def test_every_community_format_loads_with_weights_only(kind, small_state, tmp_path):
    path = tmp_path / f"{kind}.pth"
    torch.save(community_checkpoints(small_state)[kind], path)
    base = load(path)
    assert base.key_order == list(small_state)
    assert base.base_rows == 50 and base.text_rows == 51
    for key, value in small_state.items():
        assert same_bytes({**base.training, **base.passthrough}[key], value), key


def test_latest_pth_numpy_rng_state_loads_without_unsafe_pickle(small_state, tmp_path):
    """AmV2's latest.pth fails plain weights_only=True; the numpy allowlist makes it load, array intact."""
    path = tmp_path / "latest.pth"
    saved = community_checkpoints(small_state)["amv2_latest"]
    torch.save(saved, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    raw = torch_load(path)
    keys = raw["rng_state"]["numpy"][1]
    assert isinstance(keys, np.ndarray) and keys.dtype == np.uint32 and keys.shape == (624,)
    assert np.array_equal(keys, saved["rng_state"]["numpy"][1])
    assert raw["rng_state"]["python"][1] == saved["rng_state"]["python"][1]


class NumpyOnePickler(pickle._Pickler):
    """Writes numpy's reconstructor under its numpy 1.x name, as a checkpoint saved with numpy < 2 has it."""

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


class NumpyOneModule:
    Pickler = NumpyOnePickler
    Unpickler = pickle.Unpickler


def test_numpy_one_pickles_load_too(small_state, tmp_path):
    path = tmp_path / "latest.pth"
    torch.save({"model": small_state, "rng_state": {"numpy": np.random.get_state()}}, path,
               pickle_module=NumpyOneModule, pickle_protocol=2)
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert load(path).base_rows == 50


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_even_beside_allowed_numpy_state(small_state, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "latest.pth"
    torch.save({"model": small_state, "rng_state": {"numpy": np.random.get_state()}, "x": Evil(marker)}, path)
    with pytest.raises(FidelError, match=r"latest\.pth: refused to load.*system"):
        load(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Evil(marker)))  # a legacy (non-zip) pickle file
    with pytest.raises(FidelError, match="raw.pt"):
        torch_load(raw, mmap=True)
    assert not marker.exists()


@pytest.mark.parametrize("array", [np.zeros(3), np.array(["x", None], dtype=object)])
def test_numpy_arrays_other_than_uint32_rng_keys_are_refused(array, small_state, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": small_state, "extra": array}, path)
    with pytest.raises(FidelError, match="refused to load"):
        load(path)


def test_upstream_drops_are_dropped_and_wrapper_prefixes_stripped(small_state, tmp_path):
    state = dict(small_state)
    state["gpt.wte.weight"] = state["mel_embedding.weight"]
    state["inference_model.lm_head.0.weight"] = torch.zeros(3)
    torch.save({"model": {f"module.model.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    base = load(tmp_path / "ddp.pth")
    assert base.key_order == list(small_state)


def test_accelerate_checkpoint_folder_loads(small_state, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    folder = tmp_path / "checkpoint-1000"
    folder.mkdir()
    safetensors.save_file({f"model.{k}": v.contiguous() for k, v in small_state.items()},
                          str(folder / "model.safetensors"), metadata={"format": "pt"})
    base = load(folder)
    assert base.key_order == list(small_state) and base.base_rows == 50  # upstream order, not safetensors' sorted
    with pytest.raises(FidelError, match="no model.safetensors"):
        load(tmp_path)


@pytest.mark.parametrize("tokens", [50, 77])
def test_base_rows_come_from_the_checkpoint(tokens, tmp_path):
    torch.save(layout_state_dict(small_gpt(tokens)), tmp_path / "gpt.pth")
    assert load(tmp_path / "gpt.pth", small_gpt(tokens)).base_rows == tokens


def mutated(state: dict, change) -> dict:
    state = dict(state)
    change(state)
    return state


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("gpt.h.1.mlp.c_fc.bias"), r"missing: gpt\.h\.1\.mlp\.c_fc\.bias"),
    (lambda s: s.update({"gpt.h.2.ln_1.weight": torch.zeros(32)}), r"unexpected: gpt\.h\.2\.ln_1\.weight"),
    (lambda s: s.update({"mel_head.bias": torch.zeros(65)}), r"mel_head\.bias \(65,\) != \(66,\)"),
    (lambda s: s.update({"speed_emb.weight": s["speed_emb.weight"].half()}), r"not torch\.float32: speed_emb"),
    (lambda s: s.pop("perceiver_encoder.latents"), r"conditioning missing: perceiver_encoder\.latents"),
    (lambda s: s.update({"emo_layer.bias": torch.zeros(5)}), r"conditioning .*emo_layer\.bias \(5,\) != \(32,\)"),
    (lambda s: s.update({"conditioning_encoder.extra": torch.zeros(1)}), r"unexpected: conditioning_encoder\.extra"),
])
def test_a_state_dict_that_does_not_match_the_config_is_refused_with_key_names(change, message, small_state, tmp_path):
    path = tmp_path / "gpt.pth"
    torch.save(mutated(small_state, change), path)
    with pytest.raises(FidelError, match=message) as info:
        load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_text_rows_must_agree_with_the_configs_number_text_tokens(small_state, tmp_path):
    torch.save(small_state, tmp_path / "gpt.pth")
    with pytest.raises(FidelError, match=r"51 rows, but the config's number_text_tokens 60 wants 61"):
        load(tmp_path / "gpt.pth", small_gpt(60))


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(FidelError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pth")
    truncated = tmp_path / "cut.pth"
    torch.save({"a": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(FidelError, match="cut.pth"):
        read_state_dict(truncated)
    torch.save({"optimizer": {}}, tmp_path / "no_model.pth")
    with pytest.raises(FidelError, match="no UnifiedVoice state_dict"):
        read_state_dict(tmp_path / "no_model.pth")


def test_fine_tuning_the_base_language_with_the_base_tokenizer_itself(tiny_project, tmp_path, capsys):
    """N = B (a new speaker, no new rows but row B): the default init once crashed hashing a stride-0 tensor."""
    import random as stdlib_random

    from fidel_tts.flows.cli import main as fidel
    from fidel_tts.trainer.text.tokenizer import load_tokenizer

    from tests.fixtures.synthetic import ENGLISH_WORDS, sentences, write_pairs

    p = tiny_project
    sp = load_tokenizer(p.base_tokenizer)
    english = [s.upper() for s in sentences(ENGLISH_WORDS, 24, stdlib_random.Random(1), ".")]
    cfg = p.cfg.with_text_tokens(sp.get_piece_size())
    speakers = ["spk0", "spk1"]
    train_manifest = write_pairs(p.root / "en", "train", english[:18], speakers, sp, cfg, 1)
    val_manifest = write_pairs(p.root / "en", "val", english[18:], speakers, sp, cfg, 2)
    out = tmp_path / "run"
    assert fidel(["train", "--train-manifest", str(train_manifest), "--val-manifest", str(val_manifest),
                  "--tokenizer", str(p.base_tokenizer), "--config", str(p.base_config),
                  "--base-checkpoint", str(p.base_checkpoint), "--output-dir", str(out), "--max-steps", "2",
                  "--save-interval", "2", "--val-interval", "2", "--batch-size", "4"]) == 0
    assert "stride" not in capsys.readouterr().err
    assert list(out.glob("ckpt-step*.pt"))


def test_hashes_and_byte_comparisons_take_expanded_tensors():
    from fidel_tts.trainer.model.weights import tensor_sha256

    expanded = torch.tensor(0.5).expand(1).clone()  # size-1 dim, stride 0: "contiguous", yet no byte view
    assert expanded.stride() == (0,)
    assert tensor_sha256(expanded) == tensor_sha256(torch.tensor([0.5]))
    assert same_bytes(expanded, torch.tensor([0.5]))
