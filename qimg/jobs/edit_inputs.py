"""From an edit's options to what the engine takes: the canvas and mask of an inpaint or outpaint, checked
before any model loads (mask files read and matched to their image here). Shared by single edits, batches and
chains."""

from pathlib import Path

import numpy as np

from qimg import masks
from qimg.errors import UsageError
from qimg.images import alpha_mask, load_image, read_mask


def check_strength(strength: float) -> None:
    if strength <= 0:
        raise UsageError(f"--strength {strength}: must be above 0 (1 regenerates from scratch)")


def load_mask(path: str | Path, size: tuple[int, int], resize: bool = False) -> masks.Mask:
    """A mask file (images.read_mask) for an image of `size` (W, H). A mask of another size is an error unless
    `resize`, which stretches it bilinearly to the image."""
    m = read_mask(path)
    (w, h), (width, height) = (m.shape[1], m.shape[0]), size
    if (w, h) == (width, height):
        return m
    if not resize:
        raise UsageError(f"mask {path} is {w}x{h} but the image is {width}x{height}; pass --mask-resize to scale it")
    return masks.resize_mask(m, size)


def inpaint_mask(size, picture, image: Path | str, mask, rect, mask_resize, invert_mask, grow, feather, words=None):
    """The final inpaint mask on an image of size (W, H) from the options: --mask, --rect and `words` (the region
    --mask-prompt found) in a union, else the input's transparency (`picture`, None when there is none to use);
    then invert, grow, feather."""
    width, height = size
    parts = [load_mask(mask, (width, height), mask_resize)] if mask else []
    if words is not None:
        parts.append(words)
    if rect:
        parts.append(masks.rect_mask([masks.parse_rect(r, width, height) for r in rect], width, height))
    if not parts:
        alpha = alpha_mask(picture) if picture is not None else None
        if alpha is None:
            raise UsageError(f"no mask: give --mask FILE or --rect X,Y,W,H ({image} has no transparent pixels)")
        parts.append(alpha)
    m = parts[0] if len(parts) == 1 else np.maximum.reduce(parts)
    return masks.adjust(m, invert_mask, grow, feather)


def prepare(image: Path, build_mask):
    """Read an input and build its (canvas, mask): every problem with the file shows here, before the model."""
    pixels, picture = load_image(image)
    canvas, mask = build_mask(image, pixels, picture)
    if mask is not None:  # None: an instruction edit of the whole picture
        masks.ensure_not_empty(mask, "the mask")
    return canvas, mask
