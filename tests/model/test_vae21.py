"""qimg's Qwen-Image-2.1 RGBA VAE against diffusers' AutoencoderKLQwenImage21 on tiny random weights (CPU,
float32): encode (the posterior's mode, normalised as the pipeline does) and decode (de-normalised first)."""

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKLQwenImage21

from qimg.model.vae21 import QwenImage21VAE, VAE21Config

CFG = VAE21Config.tiny()
TOL = 1e-4

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = AutoencoderKLQwenImage21(**{k: list(v) if isinstance(v, tuple) else v
                                     for k, v in dataclasses.asdict(CFG).items()}).eval()
    with torch.no_grad():  # norms off 1 and biases off 0, so a skipped or misplaced one shows
        for name, p in ref.named_parameters():
            if name.endswith(("gamma", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    with torch.device("meta"):
        ours = QwenImage21VAE(CFG)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def stats(shape=(1, -1, 1, 1, 1)):
    return torch.tensor(CFG.latents_mean).view(shape), torch.tensor(CFG.latents_std).view(shape)


@torch.no_grad()
def test_encode_matches_reference(models):
    ref, ours = models
    x = torch.rand(2, 4, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1  # RGBA, alpha included
    mean, std = stats()
    expected = (ref.encode(x[:, :, None]).latent_dist.mode() - mean) / std  # the pipeline's _encode_vae_image
    out = ours.encode(x)
    assert out.shape == (2, CFG.z_dim, 2, 3)
    assert (out - expected[:, :, 0]).abs().max() <= TOL


@torch.no_grad()
def test_decode_matches_reference(models):
    ref, ours = models
    z = torch.randn(1, CFG.z_dim, 3, 2, generator=torch.Generator().manual_seed(2))
    mean, std = stats()
    expected = ref.decode(z[:, :, None] * std + mean).sample[:, :, 0]  # the pipeline de-normalises, then decodes
    out = ours.decode(z)
    assert out.shape == (1, 4, 48, 32)
    assert (out - expected).abs().max() <= TOL


@torch.no_grad()
def test_round_trip_matches_reference(models):
    ref, ours = models
    x = torch.rand(1, 4, 48, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    expected = ref(x[:, :, None]).sample[:, :, 0]  # encode, mode, decode
    out = ours.decode(ours.encode(x))
    assert (out - expected).abs().max() <= TOL
    assert torch.allclose(ours.denormalize(ours.normalize(x[:, :1].expand(-1, CFG.z_dim, -1, -1))),
                          x[:, :1].expand(-1, CFG.z_dim, -1, -1), atol=1e-6)


def test_refusals():
    with pytest.raises(ValueError, match="unknown VAE config keys: use_fancy"):
        VAE21Config.from_dict({"use_fancy": 1})
    with pytest.raises(ValueError, match="is_residual"):
        VAE21Config.from_dict({"is_residual": False})
    with pytest.raises(ValueError, match="not a multiple of 16"):
        with torch.device("meta"):
            QwenImage21VAE(CFG).encode(torch.zeros(1, 4, 40, 32, device="meta"))


def test_real_size_keys_and_shapes_are_the_references():
    with torch.device("meta"):
        ref = AutoencoderKLQwenImage21().state_dict()
        ours = QwenImage21VAE(VAE21Config()).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
