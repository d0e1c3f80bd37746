"""fidel's GPT-2 blocks (F.scaled_dot_product_attention) equal transformers.GPT2Model on the same weights, in
fp32 to 1e-5: upstream builds the backbone from GPT2Model with wte deleted and wpe returning zeros."""

import pytest
import torch
from fidel_tts.trainer.model.config import GPTConfig
from fidel_tts.trainer.model.gpt import Backbone, Batch, UnifiedVoiceGPT

transformers = pytest.importorskip("transformers")  # a test-only dependency (pyproject's `test` extra)

TOLERANCE = 1e-5


def gpt2_like(backbone: Backbone, dim: int, layers: int, heads: int, positions: int, attention: str):
    """A GPT2Model configured as upstream builds it, holding the backbone's weights; wpe zero as upstream's."""
    config = transformers.GPT2Config(n_embd=dim, n_layer=layers, n_head=heads, n_positions=positions,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                     attn_implementation=attention, use_cache=False)
    model = transformers.GPT2Model(config).eval()
    missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
    assert set(missing) == {"wte.weight", "wpe.weight"} and not unexpected
    with torch.no_grad():
        model.wpe.weight.zero_()
    return model


def randomised(backbone: Backbone, seed: int) -> Backbone:
    """Every tensor random, norms included, so no weight can hide behind a default of 1 or 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in backbone.named_parameters():
            scale = 0.5 if ("ln" in name and name.endswith("weight")) else 0.05
            t.copy_(torch.randn(t.shape, generator=g) * scale + (1.0 if "ln" in name and "weight" in name else 0.0))
    return backbone.eval()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_backbone_equals_gpt2model(attention):
    dim, layers, heads, length = 64, 3, 4, 50
    ours = randomised(Backbone(dim, layers, heads), seed=0)
    theirs = gpt2_like(ours, dim, layers, heads, positions=64, attention=attention)
    x = torch.randn(3, length, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(inputs_embeds=x).last_hidden_state
        got = ours(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE)


def test_whole_training_forward_equals_one_built_on_gpt2model():
    """The UnifiedVoice training path with GPT2Model swapped in gives the same text and mel logits."""
    cfg = GPTConfig(model_dim=64, layers=2, heads=4, max_text_tokens=30, max_mel_tokens=60, number_text_tokens=70,
                    number_mel_codes=34, start_mel_token=32, stop_mel_token=33)
    torch.manual_seed(0)
    model = UnifiedVoiceGPT(cfg, base_rows=40).eval()
    randomised(model.gpt, seed=2)
    g = torch.Generator().manual_seed(3)
    batch = Batch(torch.randint(2, 71, (2, 12), generator=g), torch.tensor([12, 6]),
                  torch.randint(0, 32, (2, 40), generator=g), torch.tensor([40, 25]),
                  torch.randn(2, 32, 64, generator=g), torch.randn(2, 64, generator=g))
    with torch.no_grad():
        ours = model(batch)
        gpt2 = gpt2_like(model.gpt, 64, 2, 4, positions=cfg.mel_positions + cfg.text_positions, attention="sdpa")

        class Wrapped(torch.nn.Module):
            def forward(self, x):
                return gpt2(inputs_embeds=x).last_hidden_state

        model.gpt = Wrapped()
        theirs = model(batch)
    for a, b in zip(ours, theirs, strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=TOLERANCE)
        else:
            assert torch.equal(a, b)
