"""The picture a chain of edits works on, between edits: known pixels, the latent carried in memory, and
how much of the latent's decode replaces the pixels.

Design. An edit's sampler leaves every latent cell its mask keeps exactly as it was given (`keep_known`), so
the latent that comes out of edit k is the one to feed edit k+1: kept cells still hold the first encoding
of the original, edited cells hold what the sampler made. Carrying it avoids a VAE decode and encode per
round, which is slow and drifts. Pixels are made once, at the end: the decoded latent composited over the
original pixels with `pending` = 1 - prod(1 - mask_k), the union of every edit's (soft) mask, so a pixel
no edit touched is byte-identical to the original however many rounds ran. Edit k+1 therefore sees, in
fully edited cells, exactly the latent of the composited result, and in fully kept cells exactly the
original's latent; only cells an edge or a soft mask cuts through differ from a fresh encoding of it.

The latent covers a window of the canvas whose top-left sits at `origin`, 0 to 7 pixels above and left of
the canvas, so that an outpaint by any number of pixels keeps the old cells on the new grid; its sides are
multiples of 16 (8x VAE cells, 2x2 transformer patches). An instruction edit (instruct.py) runs the model on
the whole canvas resampled to its working size instead: its latent then covers the canvas at `work` (W, H),
and its decode is resampled back onto the canvas; the same compositing keeps untouched pixels exact.
Everything here is pure numpy/torch.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from qimg.masks import outpaint_canvas

CELL = 8  # pixels per latent cell
MULTIPLE = 16  # a window side: VAE cells times 2x2 patches


@dataclass(frozen=True)
class Canvas:
    pixels: np.ndarray  # (H, W, 3) uint8: the original where it lies on the canvas (grown areas: prefill)
    pending: np.ndarray  # (H, W) float32 in [0, 1]: weight of the latent's decode over `pixels`
    latent: torch.Tensor | None = None  # (1, 16, h, w) over the window; None: encode `pixels` when needed
    origin: tuple[int, int] = (0, 0)  # the window's top-left on the canvas, (x, y), each in (-8, 0]
    work: tuple[int, int] | None = None  # (W, H) of a latent covering the whole canvas resampled; None: the window

    @classmethod
    def start(cls, pixels: np.ndarray) -> "Canvas":
        return cls(pixels, np.zeros(pixels.shape[:2], np.float32))

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


def window_size(size: tuple[int, int], origin: tuple[int, int]) -> tuple[int, int]:
    """(W, H) in pixels of the latent window covering a canvas of `size` from `origin`."""
    return tuple(-(-(side - o) // MULTIPLE) * MULTIPLE for side, o in zip(size, origin))


def to_window(mask: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """A canvas mask placed on the latent window; the window's margins are kept (0)."""
    (ww, wh), (ox, oy) = window_size(mask.shape[::-1], origin), origin
    out = np.zeros((wh, ww), mask.dtype)
    out[-oy : -oy + mask.shape[0], -ox : -ox + mask.shape[1]] = mask
    return out


def from_window(image: np.ndarray, origin: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The canvas part of an image decoded from the window."""
    (ox, oy), (w, h) = origin, size
    return image[-oy : -oy + h, -ox : -ox + w]


def place(decoded: np.ndarray, canvas: Canvas) -> np.ndarray:
    """The canvas's latent, decoded, as pixels of the canvas: its window's part, or resampled from `work`."""
    if canvas.work is None:
        return from_window(decoded, canvas.origin, canvas.size)
    return resample(decoded, canvas.size)


def resample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 to (W, H) = size with LANCZOS, the reference pipelines' resize; unchanged when it fits."""
    if image.shape[1::-1] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(tuple(size), Image.LANCZOS))


def edited(canvas: Canvas, mask: np.ndarray, latent: torch.Tensor) -> Canvas:
    """The canvas after an edit of `mask` whose sampler returned `latent`."""
    return replace(canvas, pending=1 - (1 - canvas.pending) * (1 - mask), latent=latent)


def grow(canvas: Canvas, margins: tuple[int, int, int, int], feather_px: int) -> tuple[Canvas, np.ndarray]:
    """The canvas grown by (left, right, top, bottom) pixels for an outpaint, and the outpaint's mask.

    The pixels grow as `qimg outpaint` grows them. The latent keeps its cells in place and fills the new
    cells with the nearest old one (the pixel prefill's edge stretch, on the latent grid): at the default
    strength of 1 new cells start from pure noise, so only a strength below 1 sees the difference."""
    left, right, top, bottom = margins
    pixels, mask = outpaint_canvas(canvas.pixels, margins, feather_px)
    pending = np.pad(canvas.pending, ((top, bottom), (left, right)))
    if canvas.latent is None:
        return Canvas(pixels, pending), mask
    ox, oy = canvas.origin[0] + left, canvas.origin[1] + top  # the old window's corner on the new canvas
    origin = (-(-ox % CELL), -(-oy % CELL))
    ww, wh = (side // CELL for side in window_size(pixels.shape[1::-1], origin))
    cx, cy = (ox - origin[0]) // CELL, (oy - origin[1]) // CELL
    h, w = canvas.latent.shape[-2:]
    latent = F.pad(canvas.latent, (cx, max(0, ww - cx - w), cy, max(0, wh - cy - h)), mode="replicate")
    return Canvas(pixels, pending, latent[..., :wh, :ww].contiguous(), origin), mask
