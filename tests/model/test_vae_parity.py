"""qimg's 2D VAE against diffusers' AutoencoderKLQwenImage on the same tiny random weights."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage

from qimg.model.vae import QwenImageVAE, VAEConfig

pytestmark = pytest.mark.parity


def reference_vae(cfg: VAEConfig) -> AutoencoderKLQwenImage:
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return AutoencoderKLQwenImage(**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})


@pytest.fixture(scope="module")
def models():
    cfg = VAEConfig.tiny()
    torch.manual_seed(0)
    ref = reference_vae(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):  # defaults are all ones: a norm that drops gamma would pass
                p.uniform_(0.5, 1.5)
        # push some decoder outputs past +-1 so the final clamp is exercised
        ref.decoder.conv_out.weight.mul_(4.0)
    with torch.device("meta"):
        ours = QwenImageVAE(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def astronaut(h: int, w: int) -> torch.Tensor:
    # a real photo so edges, flat areas and colour all reach the network; (2, 3, h, w) in [-1, 1]
    from skimage.data import astronaut as load

    img = torch.from_numpy(load()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    img = F.interpolate(img, size=(h, w), mode="area")
    return torch.cat([img, img.flip(-1)])


SIZES = [(64, 64), (48, 80)]


@pytest.mark.parametrize("h, w", SIZES)
@torch.no_grad()
def test_encode_matches_reference(models, h, w):
    ref, ours = models
    x = astronaut(h, w)
    mean = torch.tensor(ours.cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ours.cfg.latents_std).view(1, -1, 1, 1, 1)
    expected = ((ref.encode(x[:, :, None]).latent_dist.mode() - mean) / std)[:, :, 0]
    got = ours.encode(x)
    assert got.shape == (2, 16, h // 8, w // 8)
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("h, w", SIZES)
@torch.no_grad()
def test_decode_matches_reference(models, h, w):
    ref, ours = models
    z = torch.randn(2, 16, h // 8, w // 8, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(ours.cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ours.cfg.latents_std).view(1, -1, 1, 1, 1)
    expected = ref.decode(z[:, :, None] * std + mean).sample[:, :, 0]
    got = ours.decode(z)
    assert got.shape == (2, 3, h, w)
    assert 0.0 < (expected.abs() == 1.0).float().mean() < 0.5  # the clamp is active but not everywhere
    assert (got - expected).abs().max() <= 1e-4


def test_vae_keys_match_reference_at_real_size():
    with torch.device("meta"):
        ours = QwenImageVAE(VAEConfig())
        ref = AutoencoderKLQwenImage()
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)


def test_config_from_dict():
    d = {"_class_name": "AutoencoderKLQwenImage", "base_dim": 96, "dim_mult": [1, 2, 4, 4], "z_dim": 16}
    assert VAEConfig.from_dict(d) == VAEConfig()
    with pytest.raises(ValueError, match="bogus"):
        VAEConfig.from_dict({"bogus": 1})
