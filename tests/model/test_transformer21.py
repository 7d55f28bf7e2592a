"""qimg's Qwen-Image-2.1 transformer against diffusers' QwenImage21Transformer2DModel on tiny random weights
(CPU, float32): one forward without the prefix cache, and with it (fill, then read) equal to it."""

import dataclasses

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

from qimg.model.rope21 import build_layout
from qimg.model.transformer21 import PrefixCache, QwenImage21Transformer, Transformer21Config

CFG = Transformer21Config.tiny()
TOL = 1e-4

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

# The text encoder's sequence: 3 text tokens, picture 1 (2x4 latents: 2 slots), 2 text tokens, picture 2 (4x2),
# then picture 3 (2x2) right after it with no text between, 1 text token. Target: 4x6 latents (6 slots).
SLOTS = [0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
GRIDS = [(2, 4), (4, 2), (2, 2), (4, 6)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = QwenImage21Transformer2DModel(**dataclasses.asdict(CFG)).eval()
    with torch.no_grad():  # move norm weights off their init (and everything else) so a skipped norm shows
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with torch.device("meta"):
        ours = QwenImage21Transformer(CFG)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def inputs(b, slots=SLOTS, grids=GRIDS, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, sum(h * w for h, w in grids), CFG.in_channels, generator=g)
    txt = torch.randn(b, len(slots), CFG.context_in_dim, generator=g)
    return latents, txt, torch.tensor(slots, dtype=torch.bool)


def reference(ref, latents, txt, img_mask, t, grids, mask=None, cache=None, mode=None):
    b, (h, w) = latents.shape[0], grids[-1]
    full_mask = torch.cat([img_mask, torch.ones(h * w // 4, dtype=torch.bool)])[None].expand(b, -1)
    out = ref(hidden_states=latents, encoder_hidden_states=txt, timestep=t, img_shapes=[[(1, *g) for g in grids]] * b,
              img_mask=full_mask, encoder_hidden_states_mask=mask, kv_cache=cache, kv_cache_mode=mode,
              return_dict=False)[0]
    return out[:, -h * w:]


@torch.no_grad()
def test_forward_matches_reference(models):
    ref, ours = models
    latents, txt, img_mask = inputs(2)
    t = torch.tensor([0.7, 0.2])
    layout = build_layout(img_mask, GRIDS, CFG.axes_dims_rope)
    out = ours(latents, txt, t, layout)
    expected = reference(ref, latents, txt, img_mask, t, GRIDS)
    assert out.shape == (2, 24, CFG.out_channels)
    assert (out - expected).abs().max() <= TOL


@torch.no_grad()
def test_padded_prompt_matches_reference(models):
    # Sample 1's prompt is left-padded by two tokens: padded keys are masked on every path.
    ref, ours = models
    latents, txt, img_mask = inputs(2, seed=2)
    mask = torch.ones(2, len(SLOTS), dtype=torch.long)
    mask[1, :2] = 0
    t = torch.tensor([0.5, 0.5])
    layout = build_layout(img_mask, GRIDS, CFG.axes_dims_rope, mask)
    out = ours(latents, txt, t, layout)
    expected = reference(ref, latents, txt, img_mask, t, GRIDS, mask)
    assert (out - expected).abs().max() <= TOL
    cache = PrefixCache()
    ours(latents, txt, t, layout, cache)
    assert (ours(latents, txt, t, layout, cache) - out).abs().max() <= 1e-5


@torch.no_grad()
def test_prefix_cache_equals_no_cache(models):
    ref, ours = models
    latents, txt, img_mask = inputs(1, seed=3)
    layout = build_layout(img_mask, GRIDS, CFG.axes_dims_rope)
    cache, ref_cache = PrefixCache(), QwenImage21KVCache(CFG.num_layers)
    for step, t in enumerate([torch.tensor([0.9]), torch.tensor([0.4]), torch.tensor([0.1])]):
        step_latents = latents.clone()
        step_latents[:, -24:] = torch.randn(1, 24, CFG.in_channels, generator=torch.Generator().manual_seed(step))
        plain = ours(step_latents, txt, t, layout)
        with_cache = ours(step_latents, txt, t, layout, cache)
        expected = reference(ref, step_latents, txt, img_mask, t, GRIDS, cache=ref_cache,
                             mode="extract" if step == 0 else "cached")
        assert cache.filled and cache.prefix == layout.prefix
        assert (with_cache - plain).abs().max() <= 1e-5
        assert (with_cache - expected).abs().max() <= TOL
    # Only the target's latents are read once the cache is filled.
    assert torch.equal(ours(step_latents[:, -24:], txt[:, :0], t, layout, cache), with_cache)


@torch.no_grad()
def test_text_to_image_matches_reference(models):
    # No pictures: the prefix is text alone, one causal run.
    ref, ours = models
    latents, txt, img_mask = inputs(1, slots=[0] * 7, grids=[(2, 6)], seed=4)
    layout = build_layout(img_mask, [(2, 6)], CFG.axes_dims_rope)
    assert layout.segments == ((0, 7, True),)
    out = ours(latents, txt, torch.tensor([0.3]), layout)
    assert (out - reference(ref, latents, txt, img_mask, torch.tensor([0.3]), [(2, 6)])).abs().max() <= TOL


def test_layout_refuses_mismatched_grids():
    with pytest.raises(ValueError, match="picture tokens"):
        build_layout(torch.tensor(SLOTS, dtype=torch.bool), [(2, 4), (4, 4)], CFG.axes_dims_rope)


def test_cache_refused_for_another_layout(models):
    _, ours = models
    latents, txt, img_mask = inputs(1)
    cache = PrefixCache()
    with torch.no_grad():
        ours(latents, txt, torch.tensor([0.5]), build_layout(img_mask, GRIDS, CFG.axes_dims_rope), cache)
        other = build_layout(torch.zeros(4, dtype=torch.bool), [(4, 6)], CFG.axes_dims_rope)
        with pytest.raises(ValueError, match="prefix cache holds"):
            ours(latents[:, -24:], txt[:, :4], torch.tensor([0.5]), other, cache)


def test_config_from_dict_refuses_unknown_keys():
    assert Transformer21Config.from_dict({"_class_name": "x", "num_layers": 2, "out_channels": None}).out_channels \
        == 64
    with pytest.raises(ValueError, match="unknown key 'guidance_embeds'"):
        Transformer21Config.from_dict({"guidance_embeds": True})
    with pytest.raises(ValueError, match="patch_size 2"):
        Transformer21Config.from_dict({"patch_size": 2})


def test_real_size_keys_and_shapes_are_the_references():
    with torch.device("meta"):
        ref = QwenImage21Transformer2DModel().state_dict()
        ours = QwenImage21Transformer(Transformer21Config()).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert sum(v.numel() for v in ours.values()) > 6e9  # the 7B model
