"""Qwen3-VL's image preprocessing: a picture -> the vision tower's patch rows and grid, exactly as
QwenImage21Pipeline's processor call makes them.

Qwen3-VL's processor is Qwen2.5-VL's (vl_image.py: transformers' Qwen2VLImageProcessorPil) with other numbers:
16-pixel patches (sides in multiples of 32), mean and std 0.5, and larger pixel bounds. Before it, the pipeline
composites an RGBA picture over white (the vision tower was trained so; the VAE reads all four channels), and
the processor composites any other picture with transparency the same way.
"""

import numpy as np
from PIL import Image

from qimg.model.vl_image import BICUBIC, ImageConfig
from qimg.model.vl_image import preprocess as preprocess_rgb

# What Qwen3-VL's preprocessor_config.json ships (size.shortest_edge, size.longest_edge, patch_size, image_mean...).
QWEN3VL_IMAGE = ImageConfig(min_pixels=65536, max_pixels=16777216, patch_size=16, image_mean=(0.5, 0.5, 0.5),
                            image_std=(0.5, 0.5, 0.5))
SHIPPED = "Qwen3-VL ships size.shortest_edge 65536 and size.longest_edge 16777216: restore the model's own file"
DEFAULTS = ImageConfig()  # the processor class's own values, for the keys a file leaves out (as transformers)


def image_config(d: dict) -> ImageConfig:
    """From the image processor's settings (processor/preprocessor_config.json, or processor_config.json's
    `image_processor`). The pixel bounds are `min_pixels`/`max_pixels` (which win, as in transformers) or
    `size`'s shortest_edge/longest_edge; each must be a whole number from 1 to Qwen3-VL's longest_edge."""
    size = d.get("size") if isinstance(d.get("size"), dict) else {}
    bounds = {}
    for name, alias in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        key, value = (name, d[name]) if d.get(name) is not None else (f"size.{alias}", size.get(alias))
        bounds[name] = getattr(DEFAULTS, name) if value is None else pixel_count(key, value)
    if bounds["min_pixels"] > bounds["max_pixels"]:
        raise ValueError(f"its smallest picture area {bounds['min_pixels']} is over its largest "
                         f"{bounds['max_pixels']}; {SHIPPED}")
    kw = {name: d[name] for name in ("patch_size", "merge_size", "temporal_patch_size", "rescale_factor")
          if d.get(name) is not None}
    for name in ("image_mean", "image_std"):
        if d.get(name) is not None:
            if not (isinstance(d[name], list) and len(d[name]) == 3):
                raise ValueError(f"{name} must be a list of 3 numbers, not {d[name]!r:.40}")
            kw[name] = tuple(d[name])
    if d.get("resample", BICUBIC) != BICUBIC:
        raise ValueError(f"resample={d['resample']!r} is not supported (Qwen3-VL resizes bicubic, 3)")
    return ImageConfig(**bounds, **kw)


def pixel_count(key: str, value) -> int:
    most = QWEN3VL_IMAGE.max_pixels
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or isinstance(value, float) and not value.is_integer():  # NaN and infinity are not whole either
        raise ValueError(f"{key} must be a whole number of pixels, not {value!r:.40}; {SHIPPED}")
    if not 1 <= value <= most:
        raise ValueError(f"{key} {value!r:.40} is outside 1..{most}; {SHIPPED}")
    return int(value)


def over_white(picture: Image.Image) -> Image.Image:
    """The RGB picture the vision tower sees: an RGBA one pasted over white with its alpha as the mask (the
    pipeline's), another with transparency alpha-composited over white (the processor's convert_to_rgb)."""
    if picture.mode == "RGBA":
        white = Image.new("RGB", picture.size, (255, 255, 255))
        white.paste(picture, mask=picture.getchannel("A"))
        return white
    if "A" in picture.getbands() or picture.info.get("transparency") is not None:
        white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, picture.convert("RGBA")).convert("RGB")
    return picture.convert("RGB")


def preprocess(picture: Image.Image, cfg: ImageConfig = QWEN3VL_IMAGE) -> tuple[np.ndarray, tuple[int, int]]:
    """A PIL picture (RGBA, RGB or any mode) -> float32 patch rows (rows * cols, 3 * 2 * 16 * 16), in
    merge-block order, and its grid (rows, cols) in patches (the processor's image_grid_thw without the 1).
    A picture already at multiples of 32 within the bounds (as the pipeline resizes them) is not resized."""
    return preprocess_rgb(np.asarray(over_white(picture)), cfg)
