"""Qwen-Image VAE (a Wan-2.1 causal 3D VAE) run as a 2D network on single images.

Numbers and parameter names follow diffusers' `AutoencoderKLQwenImage`. qimg only ever feeds one
frame, and with causal zero-padding in time a single frame meets only the last temporal slice of
each 3D kernel, so every causal conv is `conv2d(x, weight[:, :, -1])`. Parameters keep the
checkpoint's 5D shapes so a state dict loads with no renaming.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def config_from_dict(cls, d: dict):
    """A VAE config dataclass (this VAE's or 2.1's) from diffusers' vae/config.json: lists as tuples, keys
    starting with "_" skipped; raises ValueError naming any key the class does not have."""
    known = {f.name for f in fields(cls)}
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown VAE config keys: {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # must be empty: the reference crashes on encoder attention too
    # (sic) the checkpoint's spelling; only says which resamplers own a time_conv (idle on one frame)
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0  # inference only: kept so config.json loads
    input_channels: int = 3
    # per-channel statistics of the posterior mean: the transformer works on (z - mean) / std
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return config_from_dict(cls, d)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(base_dim=8)


def rms_norm(x: Tensor, gamma: Tensor) -> Tensor:
    # The reference's RMS_norm: L2-normalise over channels (fp32 for half inputs), rescale by sqrt(C).
    # x: (B, C, H, W); gamma: (C, 1, 1[, 1]) as stored in the checkpoint
    y = F.normalize(x.float(), dim=1).to(x.dtype)
    return y * x.shape[1] ** 0.5 * gamma.view(-1, 1, 1)


def attention(qkv: Tensor) -> Tensor:
    # single-head self-attention over all pixels; qkv: (B, 3C, H, W) -> (B, C, H, W)
    B, C3, H, W = qkv.shape
    # 4D and contiguous, or SDPA on CPU falls back to the math kernel and builds the (HW, HW) score matrix:
    # 34 GB for a 2048x2048 image, where the flash kernel needs a few MB.
    q, k, v = (t.contiguous() for t in qkv.flatten(2).transpose(1, 2)[:, None].chunk(3, dim=-1))  # (B, 1, HW, C)
    out = F.scaled_dot_product_attention(q, k, v)[:, 0]
    return out.transpose(1, 2).reshape(B, C3 // 3, H, W)


class CausalConv3d(nn.Conv3d):
    """A causal 3D conv applied to one frame: only the last temporal slice sees data."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int], stride=1):
        k = kernel if isinstance(kernel, int) else kernel[-1]
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=(0, k // 2, k // 2))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        return F.conv2d(x, self.weight[:, :, -1], self.bias, padding=self.padding[1:])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        # checkpoint shape: (C, 1, 1, 1) after 3D convs, (C, 1, 1) inside the attention block
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.gamma)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, conv=CausalConv3d):
        # conv: (in, out, kernel) -> a same-size conv; Qwen-Image-2.1's VAE stores plain 2D ones (vae21.conv2d)
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = conv(in_dim, out_dim, 3)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = conv(out_dim, out_dim, 3)
        self.conv_shortcut = conv(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(attention(self.to_qkv(self.norm(x))))


class Resample(nn.Module):
    """2x spatial up/downsampling. The *3d modes also own a temporal `time_conv`, which the reference
    skips on the first frame (downsample3d only caches it, upsample3d marks the cache "Rep"), so it is
    loaded but never run here."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode.startswith("upsample"):
            # halves channels on the way up; nearest-exact at 2x is a pure pixel repeat
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:
            # right/bottom padding only: a stride-2 3x3 conv then maps H to exactly H/2
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, dim: int, conv=CausalConv3d):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, conv), ResidualBlock(dim, dim, conv)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class EncoderStack(nn.Module):
    """The forward of this VAE's and Qwen-Image-2.1's (vae21.py) encoders; each builds its own layers."""

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) image -> (B, 2z, h, w) posterior mean and logvar
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class DecoderStack(nn.Module):
    """The forward of this VAE's and Qwen-Image-2.1's (vae21.py) decoders; each builds its own layers."""

    def forward(self, z: Tensor) -> Tensor:  # (B, z, h, w) latent -> (B, C, H, W) image
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Encoder(EncoderStack):  # (B, 3, H, W) -> (B, 2z, H/8, W/8)
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.input_channels, dims[0], 3)

        if cfg.attn_scales:
            raise ValueError("attn_scales must be empty (diffusers cannot run encoder attention blocks either)")
        # flat list, as in the checkpoint: res blocks, then a downsampler after every level but the last
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)

        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.z_dim * 2, 3)  # posterior mean and logvar


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None):
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])])
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Decoder(DecoderStack):  # (B, z, h, w) -> (B, 3, 8h, 8w)
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.mid_block = MidBlock(dims[0])

        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            in_dim = in_dim // 2 if i > 0 else in_dim  # the previous upsampler halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)

        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.input_channels, 3)


class QwenImageVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # built per call (not buffers) so a meta-device build loads cleanly; the reference pipelines
        # use 1/std computed in fp32 and then cast, which we mirror for bitwise-close bf16
        shape = (1, self.cfg.z_dim, 1, 1)
        mean = torch.tensor(self.cfg.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = (1.0 / torch.tensor(self.cfg.latents_std)).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latent (B, z, H/8, W/8): the posterior mode."""
        h = self.quant_conv(self.encoder(x))
        z = h[:, : self.cfg.z_dim]  # mean half; the logvar half only matters for sampling
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent (B, z, h, w) -> image (B, 3, 8h, 8w) clamped to [-1, 1]."""
        mean, inv_std = self._latent_stats(z)
        x = self.decoder(self.post_quant_conv(z / inv_std + mean))
        return x.clamp(-1.0, 1.0)
