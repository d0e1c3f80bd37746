"""fidel against the real IndexTTS2 code (`indextts2-inference` 2.1.1: upstream's model_v2, loader, generate).

- the training forward: text/mel losses, logits and every gradient fidel trains equal upstream's UnifiedVoice
  under the community trainer's loss (RobelAdugna/Indextts_Am-V2 trainers/train_gpt_v2.py compute_losses), fp32
  within 1e-5, for the base vocabulary, an extended one and duration control;
- `fidel export` loads into upstream's UnifiedVoice with upstream's `load_checkpoint` (strict), base rows and every
  untrained tensor bit-identical to the base file;
- greedy codes from upstream's `inference_speech` on that export equal fidel's own decoding: the installed
  generate (transformers 5, no cache reaches the model) against decode="training", and the KV-cache greedy loop
  that index-tts runs under its transformers 4.x against fidel's default decode="indextts2".

`pytest -s tests/unit/test_upstream.py` prints the max-abs-diff figures and the codes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

model_v2 = pytest.importorskip("indextts.gpt.model_v2")
from fidel_tts.flows.cli import main as fidel  # noqa: E402
from fidel_tts.trainer.data.loader import training_data  # noqa: E402
from fidel_tts.trainer.evaluation.generate import greedy_codes  # noqa: E402
from fidel_tts.trainer.model.config import gpt_config_from_dict, read_config_yaml  # noqa: E402
from fidel_tts.trainer.model.gpt import (  # noqa: E402
    SPLIT_KEYS,
    Batch,
    UnifiedVoiceGPT,
    is_training_path_key,
    load_upstream_state_dict,
    upstream_state_dict,
)
from fidel_tts.trainer.model.weights import same_bytes  # noqa: E402
from fidel_tts.trainer.text.tokenizer import load_tokenizer  # noqa: E402
from fidel_tts.trainer.training.checkpoint import list_checkpoints  # noqa: E402
from fidel_tts.trainer.training.trainer import train  # noqa: E402
from indextts.utils.checkpoint import load_checkpoint  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from tests.fixtures.layout_fixture import SMALL_CONDITIONING, write_layout_fixture  # noqa: E402
from tests.fixtures.synthetic import tiny_config_dict  # noqa: E402

TOL = 1e-5
GREEDY_CODES = 20
# N(0, 0.02) weights decode one code forever; louder embeddings and head make the codes depend on text and position
LOUD_KEYS = ("text_embedding.weight", "text_pos_embedding.emb.weight", "mel_embedding.weight",
             "mel_pos_embedding.emb.weight", "mel_head.weight")


@pytest.fixture(scope="module")
def base(tiny_project_template, tmp_path_factory):
    """The tiny project's data with a base of upstream's whole layout (conditioning encoders included)."""
    project = tiny_project_template
    base_size = load_tokenizer(project.base_tokenizer).get_piece_size()
    gpt = {**tiny_config_dict(base_size)["gpt"], **SMALL_CONDITIONING}
    fixture = write_layout_fixture(tmp_path_factory.mktemp("upstream_base"), gpt, seed=1)
    state = torch.load(fixture.checkpoint, weights_only=True)
    for key in LOUD_KEYS:
        state[key] = state[key] * 50
    torch.save(state, fixture.checkpoint)
    return project, fixture, gpt, state


def upstream_model(gpt: dict, state: dict) -> model_v2.UnifiedVoice:
    rows = state["text_embedding.weight"].shape[0]
    model = model_v2.UnifiedVoice(**{**gpt, "number_text_tokens": rows - 1})
    model.load_state_dict(state, strict=True)
    return model.eval()


def fidel_model(gpt: dict, state: dict, base_rows: int, duration_control: bool = False) -> UnifiedVoiceGPT:
    rows = state["text_embedding.weight"].shape[0]
    cfg = gpt_config_from_dict(gpt).with_text_tokens(rows - 1)
    model = UnifiedVoiceGPT(cfg, base_rows, duration_control=duration_control, duration_dropout=0.5)
    load_upstream_state_dict(model, {k: v for k, v in state.items() if is_training_path_key(k)})
    return model.eval()


def extended(state: dict, new_rows: int) -> dict:
    """The base state with new text rows appended (random, as an init would leave them)."""
    g = torch.Generator().manual_seed(2)
    out = dict(state)
    for key in SPLIT_KEYS:
        rows = state[key]
        out[key] = torch.cat([rows, torch.randn(new_rows, *rows.shape[1:], generator=g) * 0.5])
    return out


def random_batch(text_rows: int, base_rows: int, codes: int, dim: int) -> Batch:
    """Three pairs of different lengths (padding in every tensor), text ids from the whole vocabulary."""
    g = torch.Generator().manual_seed(3)
    text_lengths, code_lengths = torch.tensor([9, 5, 7]), torch.tensor([14, 20, 6])
    text = torch.randint(2, text_rows - 1, (3, 9), generator=g)
    text[0, :3] = torch.arange(base_rows - 1, base_rows + 2).clamp(max=text_rows - 2)  # around the boundary B
    return Batch(text, text_lengths, torch.randint(0, codes, (3, 20), generator=g), code_lengths,
                 torch.randn(3, 32, dim, generator=g), torch.randn(3, dim, generator=g))


def community_losses(model: model_v2.UnifiedVoice, batch: Batch, free: torch.Tensor | None):
    """The community trainer's compute_losses on upstream's modules. free: per item, whether the duration slot
    falls back to speed_emb(0); None without duration control (the slot is speed_emb(1))."""
    text, text_lengths, codes, code_lengths = batch.text_ids, batch.text_lengths, batch.codes, batch.code_lengths
    text_inputs = F.pad(model.set_text_padding(text.clone(), text_lengths), (0, 1), value=model.stop_text_token)
    text_inputs, text_targets = model.build_aligned_inputs_and_targets(
        text_inputs, model.start_text_token, model.stop_text_token)
    mel_inputs = F.pad(model.set_mel_padding(codes.clone(), code_lengths), (0, 1), value=model.stop_mel_token)
    mel_inputs, mel_targets = model.build_aligned_inputs_and_targets(
        mel_inputs, model.start_mel_token, model.stop_mel_token)
    zeros = torch.zeros(batch.size, dtype=torch.long)
    speed_free = model.speed_emb(zeros)
    if free is None:
        slot = model.speed_emb(zeros + 1)
    else:
        slot = model.mel_pos_embedding.emb(code_lengths.clamp(max=model.mel_pos_embedding.emb.num_embeddings - 1))
        slot = torch.where(free[:, None], speed_free, slot)
    conds = torch.cat((batch.condition + batch.emo_vec[:, None], slot[:, None], speed_free[:, None]), dim=1)
    text_emb = model.text_embedding(text_inputs) + model.text_pos_embedding(text_inputs)
    mel_emb = model.mel_embedding(mel_inputs) + model.mel_pos_embedding(mel_inputs)
    text_logits, mel_logits = model.get_logits(conds, text_emb, model.text_head, mel_emb, model.mel_head)
    text_mask = torch.arange(text_targets.shape[1])[None] < (text_lengths + 1)[:, None]
    mel_mask = torch.arange(mel_targets.shape[1])[None] < (code_lengths + 1)[:, None]
    text_loss = (F.cross_entropy(text_logits, text_targets, reduction="none") * text_mask).sum() / text_mask.sum()
    mel_loss = (F.cross_entropy(mel_logits, mel_targets, reduction="none") * mel_mask).sum() / mel_mask.sum()
    return text_loss, mel_loss, text_logits.transpose(1, 2), mel_logits.transpose(1, 2)


def upstream_grad(model: model_v2.UnifiedVoice, name: str, base_rows: int) -> torch.Tensor:
    """The upstream gradient of the tensor fidel trains as `name` (split text rows: rows B..N)."""
    split = {"text_embedding.new": "text_embedding.weight", "text_head.new_weight": "text_head.weight",
             "text_head.new_bias": "text_head.bias"}
    params = dict(model.named_parameters())
    if name in split:
        return params[split[name]].grad[base_rows:]
    return params[name].grad


@pytest.mark.parametrize("case", ["base vocabulary", "extended vocabulary", "duration control"])
def test_training_forward_equals_upstream(base, case):
    _, _, gpt, state = base
    b = state["text_embedding.weight"].shape[0] - 1
    if case != "base vocabulary":
        state = extended(state, 40)
    duration = case == "duration control"
    ours, theirs = fidel_model(gpt, state, b, duration), upstream_model(gpt, state)
    cfg = ours.cfg
    batch = random_batch(cfg.text_rows, b, cfg.number_mel_codes - 2, cfg.model_dim)

    ours.drop_duration_in_eval = duration  # dropout off, duration dropout on: compare one drawn mask
    free = None
    if duration:
        torch.manual_seed(4)
        free = torch.rand(batch.size) < ours.duration_dropout
        assert free.any() and not free.all()
    torch.manual_seed(4)
    text_loss, mel_loss = ours.loss_sums(batch).losses()
    (0.2 * text_loss + 0.8 * mel_loss).backward()
    ref_text, ref_mel, ref_text_logits, ref_mel_logits = community_losses(theirs, batch, free)
    (0.2 * ref_text + 0.8 * ref_mel).backward()
    torch.manual_seed(4)
    with torch.no_grad():
        text_logits, _, mel_logits, _ = ours(batch)

    diffs = {
        "text_loss": (text_loss - ref_text).abs().item(),
        "mel_loss": (mel_loss - ref_mel).abs().item(),
        "text_logits": (text_logits - ref_text_logits).abs().max().item(),
        "mel_logits": (mel_logits - ref_mel_logits).abs().max().item(),
    }
    trained = [(name, p.grad) for name, p in ours.named_parameters() if p.requires_grad]
    grads = {name: (grad - upstream_grad(theirs, name, b)).abs().max().item() for name, grad in trained}
    worst = max(grads, key=grads.get)
    print(f"\n[upstream] {case}: rows {cfg.text_rows} (B={b}), "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
          + f", gradients of {len(grads)} trained tensors max {grads[worst]:.2e} ({worst})")
    assert {n for n, _ in trained} >= {"text_embedding.new", "text_head.new_weight", "speed_emb.weight",
                                       "gpt.h.0.attn.c_attn.weight", "mel_pos_embedding.emb.weight"}
    unused = {"speed_emb.weight"} | ({"text_embedding.new"} if case == "base vocabulary" else set())  # row B
    assert all(grad.abs().max() > 0 for name, grad in trained if name not in unused)
    assert max(diffs.values()) < TOL and grads[worst] < TOL, (diffs, worst, grads[worst])


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory, make_train_config):
    """A few fidel training steps on the loud base, exported with `fidel export`."""
    project, fixture, gpt, _ = base
    out = tmp_path_factory.mktemp("upstream_run")
    tc = make_train_config(project, out / "run", base_checkpoint=str(fixture.checkpoint), config=str(fixture.config),
                           max_steps=4, save_interval=4, val_interval=4, learning_rate=1e-3)
    umask = os.umask(0o022)  # the usual one: files readable by all, whoever wrote them
    try:
        result = train(tc)
        assert result.status == "completed", result.reason
        assert fidel(["export", str(list_checkpoints(out / "run")[0]), "--out", str(out / "export")]) == 0
    finally:
        os.umask(umask)
    return tc, out / "export"


def upstream_as_infer_v2(export: Path) -> model_v2.UnifiedVoice:
    """The exported model as IndexTTS2's infer_v2 loads it (`_load_gpt`)."""
    model = model_v2.UnifiedVoice(**read_config_yaml(export / "config.yaml")["gpt"])
    load_checkpoint(model, str(export / "gpt.pth"))  # strict=True
    model.eval()
    model.post_init_gpt2_config(use_deepspeed=False, kv_cache=True, half=False)
    return model


def test_the_export_loads_strictly_into_upstream_with_base_rows_and_untrained_tensors_bit_identical(
        base, exported):
    _, _, _, base_state = base
    tc, export = exported
    model = upstream_as_infer_v2(export)
    loaded = model.state_dict()
    b = base_state["text_embedding.weight"].shape[0] - 1
    pieces = load_tokenizer(tc.tokenizer).get_piece_size()
    assert model.text_embedding.weight.shape[0] == pieces + 1 > b + 1
    for key in SPLIT_KEYS:
        assert same_bytes(loaded[key][:b], base_state[key][:b]), key
    untrained = [k for k in base_state if not is_training_path_key(k)]
    assert untrained and all(same_bytes(loaded[k], base_state[k]) for k in untrained)
    moved = [k for k in base_state if is_training_path_key(k) and k not in SPLIT_KEYS
             and not torch.equal(loaded[k], base_state[k])]
    assert "gpt.h.0.attn.c_attn.weight" in moved  # a trained export, not the base again
    checkpoints = list(Path(tc.output_dir).glob("ckpt-step*"))
    written = [*export.iterdir(), *checkpoints]
    assert checkpoints and len(written) > len(checkpoints)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in written} == {f.name: 0o644 for f in written}
    print(f"\n[upstream] export: load_checkpoint strict OK, {len(base_state)} keys; base rows 0..{b - 1} of "
          f"{len(SPLIT_KEYS)} text tensors and {len(untrained)} untrained tensors bit-identical; "
          f"{len(moved)} trained tensors moved")


def cached_greedy(model: model_v2.UnifiedVoice, inputs: torch.Tensor, attention_mask: torch.Tensor,
                  max_length: int) -> torch.Tensor:
    """Greedy search as transformers 4.x runs it over GPT2InferenceModel (index-tts pins transformers 4.52):
    the model's prepare_inputs_for_generation hands forward the cache and the growing attention mask, so each new
    code goes through the KV-cache branch (`get_fixed_embedding(attention_mask.shape[1] - mel_len)`)."""
    gen, cache, ids = model.inference_model, DynamicCache(), inputs
    while ids.shape[1] < max_length:
        step = gen.prepare_inputs_for_generation(ids, past_key_values=cache, attention_mask=attention_mask,
                                                 use_cache=True)
        out = gen(**step, return_dict=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        attention_mask = F.pad(attention_mask, (0, 1), value=1)
        if token.item() == model.stop_mel_token:
            break
    return ids


def test_greedy_codes_of_upstream_inference_equal_fidels_decoding(base, exported, monkeypatch):
    tc, export = exported
    upstream = upstream_as_infer_v2(export)
    ours = UnifiedVoiceGPT(gpt_config_from_dict(read_config_yaml(export / "config.yaml")["gpt"]),
                           base_rows=base[3]["text_embedding.weight"].shape[0] - 1)
    exported_state = torch.load(export / "gpt.pth", weights_only=True)
    load_upstream_state_dict(ours, {k: v for k, v in exported_state.items() if k in upstream_state_dict(ours)})

    # infer_v2's inputs: w2v-BERT features of the prompt [1, frames, 1024], the merged emotion vector
    g = torch.Generator().manual_seed(5)
    speech = torch.randn(1, 50, 1024, generator=g)
    lengths = torch.tensor([50])
    text = training_data(tc.train_manifests, tc.val_manifests, 4, 0, tokenizer=tc.tokenizer).val_set[0].text_ids
    text_tokens = text.to(torch.int32)[None]
    with torch.no_grad():
        emovec = upstream.merge_emovec(speech, speech, lengths, lengths, alpha=1.0)
        condition = upstream.get_conditioning(speech.transpose(1, 2), lengths)

        def speech_codes() -> list[int]:
            codes, _ = upstream.inference_speech(speech, text_tokens, speech, cond_lengths=lengths,
                                                 emo_cond_lengths=lengths, emo_vec=emovec, do_sample=False,
                                                 num_beams=1, max_generate_length=GREEDY_CODES)
            return codes[0].tolist()

        installed = speech_codes()  # transformers 5 generate: no cache reaches forward, every step recomputes
        monkeypatch.setattr(upstream.inference_model, "generate",
                            lambda inputs, attention_mask, max_length, **_: cached_greedy(
                                upstream, inputs, attention_mask, max_length))
        kv_cache = speech_codes()

    ours_indextts2 = greedy_codes(ours, text, condition[0], emovec[0], GREEDY_CODES).codes
    ours_training = greedy_codes(ours, text, condition[0], emovec[0], GREEDY_CODES, decode="training").codes
    print(f"\n[upstream] first {GREEDY_CODES} greedy codes, text of {len(text)} ids:"
          f"\n  upstream inference_speech, KV cache (index-tts, transformers 4.x): {kv_cache}"
          f"\n  fidel decode=indextts2:                                          {ours_indextts2}"
          f"\n  upstream inference_speech, installed generate (transformers 5):  {installed}"
          f"\n  fidel decode=training:                                           {ours_training}")
    assert len(kv_cache) == len(installed) == GREEDY_CODES  # no stop within 20: all 20 compared
    assert ours_indextts2 == kv_cache
    assert ours_training == installed
    assert kv_cache != installed  # the two layouts really decode differently here
