"""Qwen-Image-2.1 end to end against diffusers' QwenImage21Pipeline on the tiny folders, CPU float32: the same
seed gives the same RGBA image within 1/255 (alpha included), for text to image at two sizes, edits with one
and three pictures, a Chinese instruction, an RGBA picture, with and without the prefix KV cache, with guidance
on and off, and Turbo's own sigma grid. And the identity regression: a masked edit at an odd size keeps every
pixel outside the mask, alpha included."""

import numpy as np
import pytest
import torch
from PIL import Image
from qwen21_folder import reference_pipeline

from qimg.engine.qwen21 import Engine21
from qimg.engine.request import Sampling
from qimg.errors import QimgWarning
from qimg.sampling import Shortcuts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
AREA = 64 * 64  # the edit area (the reference's output_resolution squared) the tiny tests run at


def picture(width: int, height: int, alpha: bool = False) -> np.ndarray:
    """Gradients and a disc (opaque in a half-transparent picture when alpha)."""
    yy, xx = np.mgrid[0:height, 0:width]
    disc = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (height / 3) ** 2
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 3 % 255, np.where(disc, 255, 60)], -1)
    return image.astype(np.uint8) if alpha else image[..., :3].astype(np.uint8)


@pytest.fixture(scope="module")
def engines(qwen21_folders):
    return {kind: Engine21(folder, "cpu", "float32") for kind, folder in qwen21_folders.items()}


@pytest.fixture(scope="module")
def references(qwen21_folders):
    return {kind: reference_pipeline(folder) for kind, folder in qwen21_folders.items()}


def reference_image(pipe, prompt: str, pictures=None, **kwargs) -> np.ndarray:
    images = None if pictures is None else [Image.fromarray(p) for p in pictures]
    out = pipe(prompt, image=images, generator=torch.Generator().manual_seed(kwargs.pop("seed")), output_type="np",
               output_resolution=64, **kwargs).images[0]
    return (out * 255).round().astype(np.uint8)


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape and ours.shape[2] == 4
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def sampling(prompt: str, steps: int = 3, cfg: float = 1.0, negative: str = "", kv: bool = True, seed: int = 7):
    return Sampling(prompt, negative, steps, cfg, seed, shortcuts=Shortcuts(kv_cache=kv))


@pytest.mark.parity
@pytest.mark.parametrize("size, kv, cfg", [((96, 64), True, 1.0), ((64, 128), False, 1.0), ((96, 64), True, 3.0)])
def test_generate_matches_reference(engines, references, size, kv, cfg):
    negative = "blurry" if cfg > 1 else ""
    ours = engines["base"].generate(sampling("a red circle on a blue background", 3, cfg, negative, kv), *size).image
    reference = reference_image(references["base"], "a red circle on a blue background", width=size[0],
                                height=size[1], num_inference_steps=3, true_cfg_scale=cfg,
                                negative_prompt=negative or None, use_kv_cache=kv, seed=7)
    assert_close(ours, reference)


@pytest.mark.parity
def test_turbo_samples_its_own_grid(engines, references):
    engine = engines["turbo"]
    before = engine.calls
    with pytest.warns(QimgWarning, match="own 4-step grid"):
        ours = engine.generate(sampling("a cat sitting on a wooden table", steps=40), 64, 64).image
    assert engine.calls - before == 4  # the grid's length, whatever the steps asked
    reference = reference_image(references["turbo"], "a cat sitting on a wooden table", width=64, height=64, seed=7)
    assert_close(ours, reference)


EDITS = {
    "one picture": ("make the sky orange", [picture(64, 64)], {}),
    "three pictures": ("put the cat from picture 2 on the table", [picture(64, 64), picture(80, 48),
                                                                  picture(48, 96, alpha=True)], {}),
    "chinese": ("把天空变成橙色", [picture(64, 64)], {}),
    "rgba": ("make the sky orange", [picture(64, 64, alpha=True)], {}),
    "no kv cache": ("make the sky orange", [picture(64, 64), picture(80, 48)], dict(kv=False)),
    "guided": ("make the sky orange", [picture(64, 64, alpha=True), picture(80, 48)], dict(cfg=3.0, negative="blurry")),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", EDITS)
def test_edit_matches_reference(engines, references, case):
    prompt, pictures, options = EDITS[case]
    result = engines["base"].edit(pictures[0], pictures[1:], None, AREA, sampling(prompt, **options))
    width, height = result.work_size
    reference = reference_image(references["base"], prompt, pictures, width=width, height=height,
                                num_inference_steps=3, true_cfg_scale=options.get("cfg", 1.0),
                                negative_prompt=options.get("negative"), use_kv_cache=options.get("kv", True), seed=7)
    assert_close(result.image, reference)


def test_kv_cache_spares_the_prefix_and_changes_nothing_in_float32(engines):
    engine, pictures = engines["base"], [picture(64, 64), picture(80, 48)]
    runs = {}
    for kv in (True, False):
        engine.counts.tokens = engine.counts.cached = 0
        runs[kv] = engine.edit(pictures[0], pictures[1:], None, AREA, sampling("make the sky orange", kv=kv)).image
        runs[kv, "counts"] = (engine.counts.tokens, engine.counts.cached)
    assert np.array_equal(runs[True], runs[False])
    (with_cache, spared), (without, none) = runs[True, "counts"], runs[False, "counts"]
    assert none == 0 and spared > 0 and with_cache + spared == without


@pytest.mark.parametrize("size", [(75, 53), (101, 67)])
def test_masked_edit_keeps_every_pixel_outside_the_mask(engines, size):
    width, height = size
    image = picture(width, height, alpha=True)
    mask = np.zeros((height, width), np.float32)
    mask[height // 4: height // 2, width // 3: width - 5] = 1
    result = engines["base"].edit(image, [], mask, AREA, sampling("make the sky orange", seed=3)).image
    assert result.shape == image.shape
    assert np.array_equal(result[mask == 0], image[mask == 0])
    assert not np.array_equal(result[mask == 1], image[mask == 1])
