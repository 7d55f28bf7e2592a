"""Qwen3-VL's image preprocessing against what QwenImage21Pipeline hands its text encoder: the pipeline's white
composite of an RGBA picture, then transformers' Qwen2VLImageProcessorPil with Qwen3-VL's settings (the backend
Qwen3VLProcessor uses without torchvision); and the processor settings' loader."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from qimg.errors import QimgError, UsageError
from qimg.model.qwen3vl_image import QWEN3VL_IMAGE, image_config, preprocess
from qimg.model.qwen3vl_vision import Qwen3VLVisionConfig
from qimg.weights.qwen3vl import load_image_config

SHIPPED = {  # Qwen3-VL's preprocessor_config.json
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}


def picture(height, width, mode, seed=0):
    rng = np.random.RandomState(seed)
    if mode == "RGBA":
        pixels = rng.randint(0, 256, (height, width, 4), dtype=np.uint8)
        pixels[: height // 3, :, 3] = 0  # a fully transparent band, a half-transparent one, the rest random
        pixels[height // 3: height // 2, :, 3] = 128
        return Image.fromarray(pixels, "RGBA")
    if mode == "LA":
        return Image.fromarray(rng.randint(0, 256, (height, width, 2), dtype=np.uint8), "LA")
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(mode)


def reference(image: Image.Image, **settings):
    """The pipeline's composite for RGBA, then the processor."""
    from transformers import Qwen2VLImageProcessorPil

    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        image = white
    processor = Qwen2VLImageProcessorPil(**({k: v for k, v in SHIPPED.items() if "_type" not in k
                                             and k != "processor_class"} | settings))
    out = processor(images=[image], return_tensors="np")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


@pytest.mark.parity
@pytest.mark.parametrize("size, mode", [
    ((256, 384), "RGBA"),  # multiples of 32 within the bounds, as the pipeline resizes them: no resize
    ((1024, 1024), "RGB"),
    ((451, 300), "RGBA"),  # odd sides, rounded to 32s
    ((40, 50), "RGB"),  # under shortest_edge 65536: scaled up
    ((288, 320), "LA"),  # another mode with alpha: the processor's own composite
    ((320, 256), "P"),
], ids=lambda p: p if isinstance(p, str) else f"{p[1]}x{p[0]}")
def test_preprocessing_equals_the_pipelines_processor_call(size, mode):
    image = picture(*size, mode)
    rows, grid = preprocess(image, image_config(SHIPPED))
    ref_rows, ref_grid = reference(image)
    assert ref_grid == (1, *grid) and rows.dtype == ref_rows.dtype == np.float32
    assert np.array_equal(rows, ref_rows)


@pytest.mark.parity
def test_preprocessing_scales_down_to_the_largest_area():
    image = picture(700, 500, "RGB")
    rows, grid = preprocess(image, image_config(SHIPPED | {"size": {"shortest_edge": 1024, "longest_edge": 40000}}))
    ref_rows, ref_grid = reference(image, size={"shortest_edge": 1024, "longest_edge": 40000})
    assert ref_grid == (1, *grid) and np.array_equal(rows, ref_rows) and grid[0] * grid[1] * 256 <= 40000


def test_the_shipped_settings_are_the_defaults():
    assert image_config(SHIPPED) == QWEN3VL_IMAGE
    assert image_config(SHIPPED | {"max_pixels": 262144}).max_pixels == 262144  # the top-level keys win


@pytest.mark.parametrize("change, message", [
    ({"size": {"shortest_edge": 65536, "longest_edge": 1e12}}, "size.longest_edge 1000000000000.0 is outside"),
    ({"min_pixels": float("nan")}, "min_pixels must be a whole number of pixels, not nan"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "smallest picture area 5000 is over its largest 4000"),
    ({"image_mean": 0.5}, "image_mean must be a list of 3 numbers"),
    ({"resample": 2}, "resample=2 is not supported"),
])
def test_bad_settings_are_refused_naming_the_key(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        image_config(SHIPPED | change)


def test_both_saved_formats_load(tmp_path):
    legacy, current = tmp_path / "legacy", tmp_path / "current"
    legacy.mkdir(), current.mkdir()
    (legacy / "preprocessor_config.json").write_text(json.dumps(SHIPPED))
    (current / "processor_config.json").write_text(json.dumps({"image_processor": SHIPPED,
                                                               "processor_class": "Qwen3VLProcessor"}))
    tower = Qwen3VLVisionConfig()
    assert load_image_config(legacy, tower) == load_image_config(current, tower) == QWEN3VL_IMAGE
    with pytest.raises(UsageError, match="has neither preprocessor_config.json nor processor_config.json"):
        load_image_config(tmp_path)
    (current / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    with pytest.raises(UsageError, match="processor_config.json has no image_processor settings"):
        load_image_config(current)
    (legacy / "preprocessor_config.json").write_text(json.dumps(SHIPPED | {"patch_size": 14}))
    with pytest.raises(QimgError, match="cuts patches of another size than the text encoder's vision tower"):
        load_image_config(legacy, tower)
    with pytest.raises(UsageError, match=re.escape("preprocessor_config.json: size.longest_edge 0 is outside")):
        (legacy / "preprocessor_config.json").write_text(json.dumps(SHIPPED | {"size": {"longest_edge": 0}}))
        load_image_config(legacy)
