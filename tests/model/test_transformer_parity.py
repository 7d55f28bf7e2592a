"""qimg's transformer against diffusers' QwenImageTransformer2DModel on tiny random weights (CPU, fp32)."""

import dataclasses

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from qimg.model.rope import joint_rope
from qimg.model.transformer import QwenImageTransformer, TransformerConfig, patchify, unpatchify

CFG = TransformerConfig.tiny()
TOL = 1e-4


pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**dataclasses.asdict(CFG)).eval()
    with torch.no_grad():  # move norm weights off 1 (and everything else) so a skipped or wrong norm shows
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with torch.device("meta"):
        ours = QwenImageTransformer(CFG)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def inputs(b, h, w, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, h * w, CFG.in_channels, generator=g)
    txt = torch.randn(b, s, CFG.joint_attention_dim, generator=g)
    return img, txt


@torch.no_grad()
def run_both(models, img, txt, mask, t, grid):
    ref, ours = models
    h, w = grid
    expected = ref(
        hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
        img_shapes=[[(1, h, w)]] * img.shape[0], return_dict=False,
    )[0]
    return ours(img, txt, mask, t, grid), expected


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (7, 5)], ids=["square", "5x7", "7x5"])
def test_grids_match_reference(models, grid):
    img, txt = inputs(1, *grid, s=6)
    out, expected = run_both(models, img, txt, None, torch.tensor([0.6]), grid)
    assert out.shape == (1, grid[0] * grid[1], 4 * CFG.out_channels)
    assert (out - expected).abs().max() <= TOL


def test_padded_batch_matches_reference(models):
    # Prompts of 9 and 5 tokens padded to 9. The reference masks padded keys only and places text rope
    # after the image regardless of padding, so every image token of both samples is meaningful.
    img, txt = inputs(2, 5, 7, s=9)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    t = torch.tensor([0.3, 0.8])
    out, expected = run_both(models, img, txt, mask, t, (5, 7))
    assert (out - expected).abs().max() <= TOL

    # Padding must not leak: the short prompt alone, unpadded, gives the same image output.
    alone, _ = run_both(models, img[1:], txt[1:, :5], None, t[1:], (5, 7))
    assert (out[1:] - alone).abs().max() <= 1e-5


def test_all_ones_mask_equals_no_mask(models):
    img, txt = inputs(2, 4, 4, s=5)
    _, ours = models
    with torch.no_grad():
        a = ours(img, txt, torch.ones(2, 5, dtype=torch.long), torch.tensor([0.5, 0.5]), (4, 4))
        b = ours(img, txt, None, torch.tensor([0.5, 0.5]), (4, 4))
    assert torch.equal(a, b)


@pytest.mark.parametrize("t", [0.0, 0.001, 0.25, 0.5, 0.999, 1.0])
def test_timesteps_match_reference(models, t):
    img, txt = inputs(1, 4, 6, s=4, seed=2)
    out, expected = run_both(models, img, txt, None, torch.tensor([t]), (4, 6))
    assert (out - expected).abs().max() <= TOL


def test_bf16_matches_reference(models):
    # Same dtype path as the reference (t rounded to bf16; fp32 timestep sinusoids, rope and norm
    # statistics): bit-exact on CPU today. Any upcast done differently shows up at bf16 noise level
    # (~0.07 against fp32 here), far above this tolerance.
    ref, ours = models
    ref16, ours16 = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    try:
        img, txt = inputs(1, 5, 7, s=6, seed=3)
        out, expected = run_both((ref16, ours16), img.bfloat16(), txt.bfloat16(), None, torch.tensor([0.637]), (5, 7))
        assert (out.float() - expected.float()).abs().max() <= 1e-3
    finally:
        ref.float(), ours.float()


@pytest.mark.parametrize("hw", [(8, 8), (10, 14)])
def test_patchify_matches_pipeline_packing(hw):
    h, w = hw
    latents = torch.randn(2, 16, h, w)
    packed = patchify(latents)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(latents, 2, 16, h, w))
    assert torch.equal(unpatchify(packed, h, w), latents)
    # the pipeline unpacks to 5D (B, C, 1, H, W) from pixel sizes (vae_scale_factor 8)
    assert torch.equal(QwenImagePipeline._unpack_latents(packed, h * 8, w * 8, 8)[:, :, 0], latents)


def test_config_from_dict():
    real = {
        "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
        "num_layers": 60, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 768,
    }
    assert TransformerConfig.from_dict(real) == TransformerConfig()
    assert TransformerConfig.from_dict({**real, "zero_cond_t": True}).zero_cond_t  # Qwen-Image-Edit-2511
    for value in ("yes", 1, None, "false"):
        with pytest.raises(ValueError, match="zero_cond_t must be true or false"):
            TransformerConfig.from_dict({**real, "zero_cond_t": value})
    for flag in ("use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"):  # Layered, distilled
        with pytest.raises(ValueError, match=flag):
            TransformerConfig.from_dict({**real, flag: True})
        assert TransformerConfig.from_dict({**real, flag: False}) == TransformerConfig()
    with pytest.raises(ValueError, match="mystery"):
        TransformerConfig.from_dict({**real, "mystery": 1})


# --- several image grids (instruction editing: the noisy image, then its reference images) --------------


@pytest.mark.parametrize("grids", [((4, 6), (5, 3)), ((3, 3), (7, 4), (2, 2)), ((5, 5), (1, 9), (6, 3), (4, 7))],
                         ids=["2 grids", "3 grids", "4 grids"])
def test_multi_grid_rope_matches_reference(grids):
    axes = (4, 6, 6)
    s = 5
    vid, txt = QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)(
        [[(1, h, w) for h, w in grids]], device=torch.device("cpu"), max_txt_seq_len=s)
    expected = torch.cat([txt, vid])  # ours is ordered [text; images]
    cos, sin = joint_rope(grids, s, axes)
    assert cos.shape == (s + sum(h * w for h, w in grids), sum(axes) // 2)
    assert (cos - expected.real).abs().max() <= 1e-6 and (sin - expected.imag).abs().max() <= 1e-6
    # each grid is its own frame: a table built as if every grid were frame 0 differs
    frame0 = torch.cat([txt, *(QwenEmbedRope(10000, list(axes), True)([(1, h, w)], torch.device("cpu"), s)[0]
                                for h, w in grids)])
    assert (cos - frame0.real).abs().max() > 1e-2


@pytest.fixture(scope="module")
def zero_cond_models(models):
    """The same weights with Edit-2511's zero_cond_t on, in both implementations."""
    ref, ours = models
    cfg = dataclasses.replace(CFG, zero_cond_t=True)
    ref_z = QwenImageTransformer2DModel(**dataclasses.asdict(cfg)).eval()
    ref_z.load_state_dict(ref.state_dict(), strict=True)
    with torch.device("meta"):
        ours_z = QwenImageTransformer(cfg)
    ours_z.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ref_z, ours_z.eval()


@torch.no_grad()
def run_grids(models, grids, b, s, t, mask=None, seed=4, dtype=torch.float32):
    """Both models over [noisy grid; reference grids], ours returning only the noisy tokens."""
    ref, ours = models
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, sum(h * w for h, w in grids), CFG.in_channels, generator=g).to(dtype)
    txt = torch.randn(b, s, CFG.joint_attention_dim, generator=g).to(dtype)
    n = grids[0][0] * grids[0][1]
    expected = ref(
        hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
        img_shapes=[[(1, h, w) for h, w in grids]] * b, return_dict=False,
    )[0][:, :n]  # the pipelines' slice to the noisy tokens
    return ours(img, txt, mask, t, grids[0], refs=grids[1:]), expected


GRIDS = [((4, 6), (5, 3)), ((3, 5), (4, 4), (2, 7))]


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["plain", "zero_cond_t"])
@pytest.mark.parametrize("grids", GRIDS, ids=["2 grids", "3 grids"])
def test_multi_grid_forward_matches_reference(models, zero_cond_models, grids, zero_cond_t):
    out, expected = run_grids(zero_cond_models if zero_cond_t else models, grids, 1, 6, torch.tensor([0.7]))
    assert out.shape == (1, grids[0][0] * grids[0][1], 4 * CFG.out_channels)
    assert (out - expected).abs().max() <= TOL


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["plain", "zero_cond_t"])
@pytest.mark.parametrize("grids", GRIDS, ids=["2 grids", "3 grids"])
def test_multi_grid_padded_cfg_batch_matches_reference(models, zero_cond_models, grids, zero_cond_t):
    # A true-CFG pair: prompt and negative prompt of 8 and 5 tokens padded to 8, the same t.
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    out, expected = run_grids(zero_cond_models if zero_cond_t else models, grids, 2, 8, torch.tensor([0.4, 0.4]),
                              mask)
    assert (out - expected).abs().max() <= TOL


@torch.no_grad()
def test_zero_cond_t_changes_only_edits_and_needs_references(models, zero_cond_models):
    # zero_cond_t must change the output of a run with references (so the tests above can tell it from off),
    # and a run without references is the plain model's whatever the flag (the reference's modulate_index
    # is all zeros then).
    grids = GRIDS[0]
    on, _ = run_grids(zero_cond_models, grids, 1, 6, torch.tensor([0.7]))
    off, _ = run_grids(models, grids, 1, 6, torch.tensor([0.7]))
    assert (on - off).abs().max() > 1e-3
    img, txt = inputs(1, 4, 6, s=4)
    t = torch.tensor([0.5])
    assert torch.equal(zero_cond_models[1](img, txt, None, t, (4, 6)), models[1](img, txt, None, t, (4, 6)))


def test_multi_grid_token_count_is_checked(models):
    img, txt = inputs(1, 4, 6, s=4)
    with pytest.raises(ValueError, match="4x6 \\+ 2x2"):
        models[1](img, txt, None, torch.tensor([0.5]), (4, 6), refs=((2, 2),))


def test_multi_grid_zero_cond_t_bf16_matches_reference(zero_cond_models):
    ref, ours = zero_cond_models
    ref16, ours16 = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    try:
        out, expected = run_grids((ref16, ours16), GRIDS[1], 1, 5, torch.tensor([0.37]), seed=9, dtype=torch.bfloat16)
        assert (out.float() - expected.float()).abs().max() <= 1e-3
    finally:
        ref.float(), ours.float()
