"""Qwen-Image-2.1's sizes and shapes, pure functions the engine (qwen21.py) and the jobs share: the reference's
defaults, latents packed one token per 16x16 pixels, the working size of a picture, RGB made RGBA."""

from dataclasses import dataclass

import numpy as np
import torch

from qimg.engine.components import Defaults
from qimg.engine.instruct import calculate_dimensions

SCALE = 16  # pixels per latent cell and per token: the VAE is 16x and the transformer reads latents unpatched
MULTIPLE = 32  # the reference rounds every size down (or a picture's to nearest) to this
CHANNELS = 64


@dataclass(frozen=True)
class Defaults21(Defaults):
    """The reference pipeline's defaults for 2.1: 40 steps, no guidance (the model is CFG-distilled: guidance
    needs a negative prompt, and there is none by default), 1024x1024, pictures at about 1024^2, up to 2K."""

    steps: int = 40
    cfg: float = 1.0
    negative_prompt: str = ""  # empty: none, so no guidance whatever --cfg says
    max_pixels: int = 2048 * 2048


def pack(z: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) -> (1, h*w, C): 2.1 reads latents unpatched."""
    return z.flatten(2).transpose(1, 2)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def working_size(size: tuple[int, int], area: int) -> tuple[int, int]:
    """(W, H) of about `area` pixels at the aspect of `size`, sides multiples of 32 (calculate_dimensions)."""
    return calculate_dimensions(area, size[0] / size[1])


def rgba(image: np.ndarray) -> np.ndarray:
    """(H, W, 3 or 4) uint8 as RGBA: an opaque alpha added to RGB, as the reference's convert("RGBA")."""
    if image.shape[2] == 4:
        return image
    return np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
