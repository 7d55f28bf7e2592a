"""Qwen-Image-2.1's RGBA VAE (a Wan-2.2-style residual VAE, 16x, 64 channels) run on single images.

Numbers and parameter names follow diffusers' `AutoencoderKLQwenImage21`, which already specialises Wan's
causal 3D convs to one frame: its convs are stored 2D, so each is a plain same-size `nn.Conv2d`. What one frame
leaves of the temporal parts: the resamplers' `time_conv` is loaded but never runs (the reference skips it on
the first frame); the encoder's average-pooling shortcut pools a zero frame in with the picture when its level
also halves time, and the decoder's duplicating shortcut keeps the last of its temporal copies (the reference's
`first_chunk`). Residual, attention and mid blocks are the 20B VAE's (vae.py) with 2D convs.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from qimg.model.vae import DecoderStack, EncoderStack, MidBlock, ResidualBlock, RMSNorm, config_from_dict


@dataclass(frozen=True)
class VAE21Config:
    base_dim: int = 96
    decoder_base_dim: int | None = 144  # None: base_dim
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # read by the reference only for non-residual VAEs: unused here too
    temperal_downsample: tuple[bool, ...] = (False, True, True, True)  # (sic) the checkpoint's spelling
    dropout: float = 0.0  # inference only: kept so config.json loads
    is_residual: bool = True
    in_channels: int = 4  # RGBA
    out_channels: int = 4
    patch_size: int | None = None
    scale_factor_temporal: int | None = 8
    scale_factor_spatial: int | None = 16
    # per-channel statistics of the posterior mean: the transformer works on (z - mean) / std
    latents_mean: tuple[float, ...] = (
        0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.651, 0.2732,
        0.7562, -0.6163, -1.0277, 3.8363, 2.021, 0.0472, 0.932, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
        -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555,
        0.0746, -3.0751, -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.368, 0.4809, -0.4433, 0.3764, 0.5729,
        -2.0595, 1.096, -1.326, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632,
        0.5547, -1.7121, -0.1562, 0.0304,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.791, 3.0785, 3.65, 3.9308, 3.0904, 2.8778,
        3.7675, 3.732, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489, 3.4896, 3.8513,
        3.9323, 3.4719, 3.7498, 4.283, 3.5694, 4.2467, 3.9037, 3.2947, 5.077, 3.5075, 3.27, 3.4767, 2.8063,
        5.1125, 3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.055,
        5.5614, 4.2963, 4.408, 3.4959, 3.8747, 3.7608, 3.5735, 3.149, 3.7662, 3.6746, 3.4563, 3.8161,
    )  # fmt: skip

    def __post_init__(self):
        if self.is_residual is not True:
            raise ValueError("VAE config: is_residual must be true (Qwen-Image-2.1's VAE); a plain Wan-2.1 VAE is "
                             "the 20B models' (vae.py)")
        if self.patch_size is not None:
            raise ValueError(f"VAE config: patch_size {self.patch_size} is not supported (Qwen-Image-2.1 has none)")
        if self.scale_factor_spatial not in (None, self.scale):
            raise ValueError(f"VAE config: scale_factor_spatial {self.scale_factor_spatial} does not match "
                             f"dim_mult's {len(self.dim_mult) - 1} downsamplings ({self.scale}x)")
        if not len(self.latents_mean) == len(self.latents_std) == self.z_dim:
            raise ValueError(f"VAE config: latents_mean and latents_std need z_dim={self.z_dim} values each")

    @property
    def scale(self) -> int:
        """Pixels per latent pixel, each way."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAE21Config":
        return config_from_dict(cls, d)

    @classmethod
    def tiny(cls) -> "VAE21Config":
        return cls(base_dim=8, decoder_base_dim=12, z_dim=8, dim_mult=(1, 2, 2, 2, 2),
                   latents_mean=tuple(0.1 * i - 0.3 for i in range(8)),
                   latents_std=tuple(1 + 0.2 * i for i in range(8)))


def conv2d(in_dim: int, out_dim: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(in_dim, out_dim, kernel, padding=kernel // 2)


def avg_down(x: Tensor, out_dim: int, time: int, space: int) -> Tensor:
    """The encoder's shortcut (AvgDown3D on one frame): each output channel the mean of a group of input
    channels x (time, space, space) phases; with time = 2 the causal zero frame is one of the phases."""
    b, c, h, w = x.shape
    x = x.view(b, c, 1, h // space, space, w // space, space).permute(0, 1, 2, 4, 6, 3, 5)  # (B, C, 1, s, s, h', w')
    if time == 2:
        x = torch.cat([torch.zeros_like(x), x], dim=2)
    return x.reshape(b, out_dim, -1, h // space, w // space).mean(dim=2)


def dup_up(x: Tensor, out_dim: int, time: int, space: int) -> Tensor:
    """The decoder's shortcut (DupUp3D on the first chunk): channels repeated into (time, space, space) phases,
    the last temporal one kept, the spatial ones spread over a space x space pixel block."""
    b, c, h, w = x.shape
    x = x.repeat_interleave(out_dim * time * space * space // c, dim=1)
    x = x.view(b, out_dim, time, space, space, h, w)[:, :, time - 1]  # (B, out, s, s, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, out_dim, h * space, w * space)


class Resample(nn.Module):
    def __init__(self, dim: int, mode: str, out_dim: int):
        super().__init__()
        if mode.startswith("upsample"):  # nearest-exact at 2x is a pure pixel repeat
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, out_dim, 3, padding=1))
        else:  # right/bottom padding only: a stride-2 3x3 conv then maps H to exactly H/2
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode.endswith("3d"):  # idle on one frame; loaded so the checkpoint matches
            self.time_conv = nn.Conv2d(dim, dim * 2 if mode == "upsample3d" else dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.resample(x)


class DownBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, time: bool, down: bool):
        super().__init__()
        self.out_dim, self.time, self.space = out_dim, 2 if time else 1, 2 if down else 1
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList(ResidualBlock(i, o, conv2d) for i, o in zip(dims[:-1], dims[1:]))
        self.downsampler = Resample(out_dim, "downsample3d" if time else "downsample2d", out_dim) if down else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = avg_down(x, self.out_dim, self.time, self.space)
        for resnet in self.resnets:
            x = resnet(x)
        return (x if self.downsampler is None else self.downsampler(x)) + shortcut


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, time: bool, up: bool):
        super().__init__()
        self.out_dim, self.time, self.up = out_dim, 2 if time else 1, up
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList(ResidualBlock(i, o, conv2d) for i, o in zip(dims[:-1], dims[1:]))
        self.upsampler = Resample(out_dim, "upsample3d" if time else "upsample2d", out_dim) if up else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = dup_up(x, self.out_dim, self.time, 2) if self.up else None
        for resnet in self.resnets:
            x = resnet(x)
        return x if shortcut is None else self.upsampler(x) + shortcut


class Encoder(EncoderStack):  # (B, 4, H, W) -> (B, 2z, H/16, W/16)
    def __init__(self, cfg: VAE21Config):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv_in = conv2d(cfg.in_channels, dims[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock(i, o, cfg.num_res_blocks, cfg.temperal_downsample[n] if n != last else False, n != last)
            for n, (i, o) in enumerate(zip(dims[:-1], dims[1:]))
        )
        self.mid_block = MidBlock(dims[-1], conv2d)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv2d(dims[-1], cfg.z_dim * 2, 3)  # posterior mean and logvar


class Decoder(DecoderStack):  # (B, z, h, w) -> (B, 4, 16h, 16w)
    def __init__(self, cfg: VAE21Config):
        super().__init__()
        mult, base = cfg.dim_mult, cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (mult[-1], *mult[::-1])]
        last, temporal = len(mult) - 1, cfg.temperal_downsample[::-1]
        self.conv_in = conv2d(cfg.z_dim, dims[0], 3)
        self.mid_block = MidBlock(dims[0], conv2d)
        self.up_blocks = nn.ModuleList(
            UpBlock(i, o, cfg.num_res_blocks, temporal[n] if n != last else False, n != last)
            for n, (i, o) in enumerate(zip(dims[:-1], dims[1:]))
        )
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = conv2d(dims[-1], cfg.out_channels, 3)


class QwenImage21VAE(nn.Module):
    def __init__(self, cfg: VAE21Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # built per call (not buffers) so a meta-device build loads cleanly
        shape = (1, self.cfg.z_dim, 1, 1)
        mean = torch.tensor(self.cfg.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.cfg.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        """Posterior mean -> the transformer's latent: (z - mean) / std, as the reference pipeline divides."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return z * std + mean

    def encode(self, x: Tensor) -> Tensor:
        """(B, 4, H, W) RGBA in [-1, 1], H and W multiples of 16 -> normalised latent (B, z, H/16, W/16): the
        posterior's mode."""
        if x.shape[-2] % self.cfg.scale or x.shape[-1] % self.cfg.scale:
            raise ValueError(f"image size {x.shape[-1]}x{x.shape[-2]} is not a multiple of {self.cfg.scale}")
        h = self.quant_conv(self.encoder(x))
        return self.normalize(h[:, : self.cfg.z_dim])  # mean half; the logvar half only matters for sampling

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent (B, z, h, w) -> RGBA image (B, 4, 16h, 16w) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(self.denormalize(z))).clamp(-1.0, 1.0)
