"""Masks: where to regenerate. Rectangles, resizing, grow/feather, latent grids, outpaint margins and canvases,
crop boxes, compositing.

A mask is a float32 array (H, W) in [0, 1]: 1 = regenerate, 0 = keep, in between = blend. Images are uint8
arrays (H, W, C). Everything here is a pure numpy/Pillow function on arrays and numbers, reading no file, so it
is cheap to test and runs before any model loads: a bad rectangle or margin fails in milliseconds. Mask files
and an input's transparency are read by images.py (read_mask, alpha_mask) and checked against their image by
jobs/edit_inputs.py (load_mask).
"""

import math
import re
from fractions import Fraction

import numpy as np
from PIL import Image, ImageFilter

from qimg import option_values
from qimg.errors import UsageError

Mask = np.ndarray  # (H, W) float32 in [0, 1]
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive

# --- Resizing --------------------------------------------------------------------------------------------


def resize_mask(m: Mask, size: tuple[int, int]) -> Mask:
    """Bilinear resize to (W, H); stays in [0, 1]."""
    if (m.shape[1], m.shape[0]) == tuple(size):
        return m.copy()
    out = Image.fromarray(m.astype(np.float32)).resize(tuple(size), Image.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0, 1)


# --- Rectangles ------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d+)?|\.\d+))\s*(%?)\s*")


def parse_rect(text: str, width: int, height: int) -> Box:
    """`--rect X,Y,W,H` in pixels or percent (of the width for X and W, of the height for Y and H), as a box
    clipped to the image. Fractional edges round outwards, so every pixel the rectangle touches is in it."""
    parts = [_NUMBER.fullmatch(p) for p in text.split(",")]
    if len(parts) != 4 or not all(parts):
        raise UsageError(
            f"--rect {text!r}: expected X,Y,W,H in pixels or percent, like 10,20,300,200 or 10%,10%,50%,50%"
        )
    if any(len(p[1]) > option_values.MAX_DIGITS for p in parts):
        raise UsageError(f"--rect {text[:40]!r}...: a value has over {option_values.MAX_DIGITS} digits")
    # Exact fractions, so 10% of 120 is 12 and not 12.000000000000002 rounded up to 13.
    x, y, w, h = (
        Fraction(p[1]) * (full if p[2] else 100) / 100 for p, full in zip(parts, (width, height, width, height))
    )
    if w <= 0 or h <= 0:
        raise UsageError(f"--rect {text!r}: width and height must be positive")
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1, y1 = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"--rect {text!r} lies outside the {width}x{height} image")
    return x0, y0, x1, y1


def rect_mask(rects: list[Box], width: int, height: int) -> Mask:
    """The union of boxes: 1 inside any of them."""
    m = np.zeros((height, width), np.float32)
    for x0, y0, x1, y1 in rects:
        m[y0:y1, x0:x1] = 1
    return m


# --- Shape edits -----------------------------------------------------------------------------------------


def invert(m: Mask) -> Mask:
    return 1 - m


def grow(m: Mask, px: int) -> Mask:
    """Grey dilation by a disk of radius `px`: each pixel takes the largest value within px pixels (Euclidean,
    so corners round off instead of squaring). Negative px shrinks (erodes) instead; 0 changes nothing."""
    if px < 0:
        return 1 - grow(1 - m, -px)  # outside the image counts as 0 in grow, i.e. as selected here: no border erosion
    box = _support(m, px)
    if px == 0 or box is None:
        return m.copy()
    sub = m[box]
    row = sub.copy()  # running max over a horizontal segment of half-width w
    acc = np.zeros_like(sub)
    w = 0
    # A disk is a stack of horizontal segments. Walking from its top row to its middle the half-width only
    # grows, so one running segment max serves every row: about 4*px array passes in all, not px*px.
    # Rows and half-widths past the image's own size shift everything out of it: skipping them keeps a
    # mistyped --grow 1000000000 as fast as --grow 1000.
    for dy in range(min(px, sub.shape[0] - 1), -1, -1):
        half = min(math.isqrt(px * px - dy * dy), sub.shape[1] - 1)
        while w < half:
            w += 1
            _shifted(np.maximum, row, sub, w, axis=1)
        _shifted(np.maximum, acc, row, dy, axis=0)
    out = np.zeros_like(m)
    out[box] = acc
    return out


def adjust(m: Mask, invert_mask: bool, grow_px: int, feather_px: int) -> Mask:
    """--invert-mask, --grow, --feather, in that order, each step dropping the last (a 4000x4000 mask is 64 MB)."""
    m = invert(m) if invert_mask else m
    m = grow(m, grow_px) if grow_px else m
    return feather(m, feather_px) if feather_px else m


def feather(m: Mask, px: int) -> Mask:
    """Soften the edge outwards: 1 at the mask's edge falling smoothly to 0 at `px` pixels outside it.

    The selected region stays as it is (the result is >= m) and nothing farther than px from a selected pixel
    changes. For a binary mask the value at distance d is smoothstep(1 - d / (px + 1)) for d <= px, so even
    px = 1 gives its neighbours 0.5. Partial pixels count as partly far away: a pixel of value v sits
    (px + 1) * (1 - v) above the image plane and d is the 3D distance to it, so weak pixels spread less.
    """
    box = _support(m, px) if px > 0 else None
    if box is None:
        return m.copy()
    sub = m[box]
    s = px + 1.0
    lifted = np.square(s * (1 - sub))
    # Squared 3D distance, separable into a vertical then a horizontal pass over offsets up to px (farther
    # pixels are cut off below anyway): the distance transform of a sampled function.
    d2 = _shifted_min_sq(_shifted_min_sq(lifted, px, axis=0), px, axis=1)
    t = np.clip(1 - np.sqrt(d2) / s, 0, 1)
    soft = np.where(d2 <= px * px, t * t * (3 - 2 * t), 0).astype(np.float32)
    out = np.zeros_like(m)
    out[box] = np.maximum(soft, sub)
    return out


def _support(m: Mask, pad: int) -> tuple[slice, slice] | None:
    """Slices of the bounding box of m > 0 widened by pad, or None for an empty mask: the morphology only
    needs to look there, which keeps a small mask on a 12-megapixel photo cheap."""
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    pad = max(pad, 0)
    return slice(max(0, rows[0] - pad), rows[-1] + 1 + pad), slice(max(0, cols[0] - pad), cols[-1] + 1 + pad)


def _shifted(op, acc: np.ndarray, src: np.ndarray, k: int, axis: int) -> None:
    """acc = op(acc, src shifted by +k and by -k along axis), in place; pixels shifted in from outside are skipped."""
    if axis == 1:
        acc, src = acc.T, src.T
    if k == 0:
        op(acc, src, out=acc)
    elif k < len(acc):
        op(acc[k:], src[:-k], out=acc[k:])
        op(acc[:-k], src[k:], out=acc[:-k])


def _shifted_min_sq(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """min over |k| <= r of a[i + k] + k*k along axis."""
    out = a.copy()
    for k in range(1, min(r, a.shape[axis] - 1) + 1):  # larger shifts leave the array: nothing to take
        _shifted(np.minimum, out, a + np.float32(k * k), k, axis)
    return out


# --- Grids -----------------------------------------------------------------------------------------------


def latent_mask(m: Mask, factor: int = 8) -> Mask:
    """(H/factor, W/factor): the max over each cell, so a cell is edited if any of its pixels is. H and W must
    be multiples of factor (pad first). factor 8 is the VAE grid, 16 the transformer's 2x2 patch tokens."""
    h, w = m.shape
    if h % factor or w % factor:
        raise ValueError(f"mask {w}x{h} is not a multiple of {factor}; pad it first")
    return m.reshape(h // factor, factor, w // factor, factor).max(axis=(1, 3))


def pad_to_multiple(image: np.ndarray, mask: Mask | None, multiple: int = 16):
    """Pad bottom and right up to a multiple: the image by repeating its edge (no hard border for the model to
    copy), the mask with 0 (keep). Returns (image, mask, (W, H) before padding), the size `crop` takes back."""
    h, w = image.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    padded = np.pad(image, ((0, ph), (0, pw)) + ((0, 0),) * (image.ndim - 2), mode="edge")
    if mask is not None:
        mask = np.pad(mask, ((0, ph), (0, pw)))
    return padded, mask, (w, h)


def crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The top-left (W, H) of an image or mask: undoes pad_to_multiple."""
    return array[: size[1], : size[0]]


# --- Outpainting -----------------------------------------------------------------------------------------


def _side(anchor: str, low: str, high: str) -> float:
    parts = anchor.split("-")
    return 0 if low in parts else 1 if high in parts else 0.5


# Where the original sits on the grown canvas, as (x, y) fractions: 0 = touching the left/top edge; read from
# each anchor's name (its left/right and top/bottom parts; the middle where it names neither).
ANCHORS = {anchor: (_side(anchor, "left", "right"), _side(anchor, "top", "bottom")) for anchor in option_values.ANCHORS}


def outpaint_margins(
    size: tuple[int, int],
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    expand: int = 0,
    to: tuple[int, int] | None = None,
    anchor: str = "center",
) -> tuple[int, int, int, int]:
    """Pixels to add on each side, (left, right, top, bottom).

    `expand` adds to every side the image is not anchored to (anchor "left" keeps the left edge); `to` grows
    the canvas to (W, H), splitting the extra by the anchor (centre: halves, the odd pixel right/bottom).
    Explicit sides add to expand; `to` stands alone. A canvas over option_values.MAX_INPUT_PIXELS is refused.
    """
    if anchor not in ANCHORS:
        raise UsageError(f"--anchor {anchor!r}: expected one of {', '.join(ANCHORS)}")
    sides = {"left": left, "right": right, "top": top, "bottom": bottom, "expand": expand}
    for name, value in sides.items():
        if value < 0:
            raise UsageError(f"--{name} {value}: must be 0 or more")
    fx, fy = ANCHORS[anchor]
    width, height = size
    if to is not None:
        if any(sides.values()):
            raise UsageError("--to cannot be combined with --left/--right/--top/--bottom/--expand")
        tw, th = to
        if tw < width or th < height:
            raise UsageError(f"--to {tw}x{th} is smaller than the {width}x{height} image; outpainting only adds")
        left, top = math.floor((tw - width) * fx), math.floor((th - height) * fy)
        margins = left, tw - width - left, top, th - height - top
    else:
        margins = (
            left + expand * (fx > 0), right + expand * (fx < 1), top + expand * (fy > 0), bottom + expand * (fy < 1)
        )
    if not any(margins):
        raise UsageError(
            "nothing to outpaint: give --left/--right/--top/--bottom, --expand, or a --to larger than the image"
        )
    option_values.check_pixels((width + margins[0] + margins[1], height + margins[2] + margins[3]),
                               "the outpainted canvas", "add fewer pixels")
    return margins


def outpaint_canvas(image: np.ndarray, margins: tuple[int, int, int, int], feather_px: int):
    """The grown canvas and its mask. Original pixels stay byte-identical in place; the new area is the
    image's edges stretched outwards and blurred (plausible colours for the VAE, no hard seam, no flat grey).
    The mask is 1 in the new area and reaches `feather_px` pixels into the original, falling to 0 exactly as
    `feather` would, so the seam itself gets regenerated."""
    left, right, top, bottom = margins
    h, w = image.shape[:2]
    canvas = np.pad(image, ((top, bottom), (left, right)) + ((0, 0),) * (image.ndim - 2), mode="edge")
    radius = max(4, max(margins) / 4)  # wide enough to melt the stretched-edge streaks
    canvas = np.array(Image.fromarray(canvas).filter(ImageFilter.GaussianBlur(radius)))
    canvas[top : top + h, left : left + w] = image

    # Inside the original, the nearest new pixel is straight across one of the grown sides.
    ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    d = np.full((h, w), np.inf, np.float32)
    for grown, dist in ((top, ys + 1), (bottom, h - ys), (left, xs + 1), (right, w - xs)):
        if grown:
            d = np.minimum(d, dist)
    t = np.clip(1 - d / (feather_px + 1), 0, 1)
    mask = np.ones(canvas.shape[:2], np.float32)
    mask[top : top + h, left : left + w] = np.where(d <= feather_px, t * t * (3 - 2 * t), 0)
    return canvas, mask


# --- Large inputs ----------------------------------------------------------------------------------------


def crop_box(m: Mask, context_px: int, max_pixels: int) -> Box:
    """The region worth sending to the model: the mask's bounding box plus `context_px` on every side, clipped.

    The whole image is used instead when it already fits in max_pixels (cropping would buy speed, not
    resolution, and cost context) or when the box covers at least half of it (a crop would then gain less than
    1.4x in linear resolution).
    """
    h, w = m.shape
    if w * h <= max_pixels:
        return 0, 0, w, h
    ensure_not_empty(m, "the mask")
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    x0, y0 = max(0, cols[0] - context_px), max(0, rows[0] - context_px)
    x1, y1 = min(w, cols[-1] + 1 + context_px), min(h, rows[-1] + 1 + context_px)
    if 2 * (x1 - x0) * (y1 - y0) >= w * h:
        return 0, 0, w, h
    return int(x0), int(y0), int(x1), int(y1)


def work_size(box_w: int, box_h: int, max_pixels: int, min_pixels: int = 512 * 512, multiple: int = 16):
    """(w, h) to run the model at for a box: its own size when that fits in max_pixels (no resampling, the
    result pastes back 1:1), scaled down to fit when larger, and scaled up to min_pixels when smaller, since
    the model turns to mush far below its training resolution. Aspect kept; sides are multiples of `multiple`
    and w * h never exceeds max_pixels."""
    area = box_w * box_h
    scale = 1.0
    if area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif area < min_pixels:
        scale = math.sqrt(min(min_pixels, max_pixels) / area)
    w = max(multiple, round(box_w * scale / multiple) * multiple)
    h = max(multiple, round(box_h * scale / multiple) * multiple)
    while w * h > max_pixels and (w > multiple or h > multiple):  # rounding up overshot: trim the longer side
        if w >= h:
            w -= multiple
        else:
            h -= multiple
    return w, h


# --- Results ---------------------------------------------------------------------------------------------


def composite(original: np.ndarray, generated: np.ndarray, m: Mask) -> np.ndarray:
    """original * (1 - m) + generated * m, rounded. Byte-identical to the original wherever m == 0 (selected
    explicitly, not left to float arithmetic) and to the generated image wherever m == 1."""
    if original.shape != generated.shape or original.shape[:2] != m.shape:
        raise ValueError(f"composite: shapes differ: {original.shape}, {generated.shape}, mask {m.shape}")
    mm = m[..., None] if original.ndim == 3 else m
    blend = original.astype(np.float32) * (1 - mm) + generated.astype(np.float32) * mm
    blend = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    return np.where(mm == 0, original, np.where(mm == 1, generated, blend))


def selected_area(m: Mask) -> int:
    """Pixels the mask touches at all."""
    return int(np.count_nonzero(m > 0))


def ensure_not_empty(m: Mask, what: str) -> Mask:
    """m itself, or a UsageError when it selects nothing (an all-black mask, a rectangle of zero area...)."""
    if selected_area(m) == 0:
        raise UsageError(f"{what} selects nothing: every pixel is 0 (keep), so there is nothing to regenerate")
    return m


# --- Masks from words ------------------------------------------------------------------------------------


def union_above(probabilities: np.ndarray, threshold: float) -> Mask:
    """The union of phrases' regions: 1 where any phrase's probability (P, H, W) reaches the threshold."""
    return (probabilities.max(axis=0) >= threshold).astype(np.float32)


def pack(m: Mask) -> np.ndarray:
    """A binary mask as bits (uint8, 8 pixels a byte): 1.5 MB for a 12-megapixel photo."""
    return np.packbits(m.reshape(-1) > 0)


def unpack(bits: np.ndarray, size: tuple[int, int]) -> Mask:
    """pack's inverse, for a mask of size (W, H)."""
    w, h = size
    return np.unpackbits(bits, count=w * h).reshape(h, w).astype(np.float32)


def box_of(m: Mask) -> Box | None:
    """The bounding box of the pixels the mask touches, or None when it touches none."""
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def to_grey(m: Mask) -> np.ndarray:
    """A mask as 8-bit grey (H, W): 0 keep, 255 regenerate, as a mask file is written (read back by
    images.read_mask)."""
    return np.round(m * 255).astype(np.uint8)
