"""Qwen2.5-VL's image preprocessing: a picture -> the vision tower's patch rows, exactly as transformers'
Qwen2VLImageProcessorPil (the backend it uses without torchvision) makes them.

The picture is resized with PIL bicubic to multiples of 28 (patch 14 x merge 2) holding about its own area
within the processor's pixel bounds, scaled to [0, 1] in float64 then float32, normalised with CLIP's mean
and std, and cut into 14x14 patches listed 2x2 merge block by merge block, each duplicated over the frame pair.
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from qimg.errors import UsageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL's number, as preprocessor_config.json's "resample" gives it
MAX_ASPECT = 200  # the processor refuses pictures longer than this
# The most pixels a picture bound may say: the reference Qwen2.5-VL processor's max_pixels (28 * 28 * 16384, what
# Qwen-Image-Edit ships). A folder saying more would have every picture resized to it: tens of GB for nothing.
MOST_PIXELS = 12845056


@dataclass(frozen=True)
class ImageConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        """Sides are multiples of this: one merged token is factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        """From processor/preprocessor_config.json. The bounds are `min_pixels`/`max_pixels` (Qwen2.5-VL's own
        keys, which win, as in transformers) or `size`'s shortest_edge/longest_edge (what transformers >= 5 writes)."""
        size = d.get("size") if isinstance(d.get("size"), dict) else {}
        kw, keys = {}, {}
        for name, alias in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            keys[name], value = (name, d[name]) if d.get(name) is not None else (f"size.{alias}", size.get(alias))
            kw[name] = None if value is None else pixel_count(keys[name], value)
        least, most = kw["min_pixels"] or cls.min_pixels, kw["max_pixels"] or cls.max_pixels
        if least > most:
            raise ValueError(f"{keys['min_pixels']} {least} is over {keys['max_pixels']} {most}; {SHIPPED}")
        for name in ("patch_size", "merge_size", "temporal_patch_size", "rescale_factor"):
            kw[name] = d.get(name)
        for name in ("image_mean", "image_std"):
            kw[name] = tuple(d[name]) if isinstance(d.get(name), list) else None
        if d.get("resample", BICUBIC) != BICUBIC:
            raise ValueError(f"resample={d['resample']!r} is not supported (Qwen2.5-VL resizes bicubic, 3)")
        return cls(**{k: v for k, v in kw.items() if v is not None})


SHIPPED = "Qwen-Image-Edit ships min_pixels 3136 and max_pixels 12845056: restore the model's own file"


def pixel_count(key: str, value) -> int:
    """A pixel bound of preprocessor_config.json: a whole number from 1 to MOST_PIXELS; `key` names it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or isinstance(value, float) and not value.is_integer():  # NaN and infinity are not whole either
        raise ValueError(f"{key} must be a whole number of pixels, not {value!r:.40}; {SHIPPED}")
    if not 1 <= value <= MOST_PIXELS:
        raise ValueError(f"{key} {value!r:.40} is outside 1..{MOST_PIXELS} (the reference Qwen2.5-VL processor's "
                         f"max_pixels); {SHIPPED}")
    return int(value)


def smart_resize(height: int, width: int, cfg: ImageConfig) -> tuple[int, int]:
    """The processor's size for a picture: each side rounded to a multiple of cfg.factor, then scaled down
    (floor) or up (ceil) as a whole when the area leaves [min_pixels, max_pixels]."""
    f = cfg.factor
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise UsageError(f"a {width}x{height} picture is too long and narrow for the vision model (over "
                         f"{MAX_ASPECT}:1); crop it")
    h, w = round(height / f) * f, round(width / f) * f
    if h * w > cfg.max_pixels:
        beta = math.sqrt(height * width / cfg.max_pixels)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h * w < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h, w


def patchify(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """(C, H, W) -> (H/14 * W/14, C*T*14*14) rows in merge-block-major order, each patch over T equal frames."""
    c, height, width = pixels.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    x = pixels.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return x.reshape(gh * gw, c * t * p * p)


def preprocess(image: np.ndarray, cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 -> float32 patch rows and the grid (rows, cols) in patches."""
    height, width = smart_resize(image.shape[0], image.shape[1], cfg)
    if (height, width) != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC))
    x = (image.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.array(cfg.image_mean, dtype=np.float32)) / np.array(cfg.image_std, dtype=np.float32)
    rows = patchify(x.transpose(2, 0, 1), cfg)
    return rows, (height // cfg.patch_size, width // cfg.patch_size)
