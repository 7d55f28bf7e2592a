"""Qwen2.5-VL's image preprocessing and vision tower against transformers: the processor's patch rows and grids
exactly, the tower's tokens on the tiny edit checkpoint, both checkpoint key layouts, the real config formats."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_edit_checkpoint import preprocessor_config

from qimg.errors import UsageError
from qimg.model import vision
from qimg.model.vision import VisionConfig, VisionTower
from qimg.model.vl_image import ImageConfig, preprocess
from qimg.weights.folders import load_module, read_config

CPU = torch.device("cpu")
SIZES = [  # (height, width)
    (451, 300),  # odd sides, rounded to 28s
    (300, 451),
    (37, 1003),  # 27:1, kept to its aspect
    (1, 150),  # 150:1 from a one-pixel row: up to min_pixels
    (13, 17),  # far below min_pixels: scaled up (ceil)
    (56, 56),  # already a multiple of 28: no resize
]


def picture(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


def reference_rows(images, **bounds):
    from transformers import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil(**bounds)(images=[Image.fromarray(i) for i in images], return_tensors="np")
    return out["pixel_values"], [tuple(g[1:]) for g in out["image_grid_thw"].tolist()]


@pytest.mark.parity
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_preprocessing_equals_the_processor(size):
    image = picture(*size)
    rows, grid = preprocess(image, ImageConfig.from_dict(preprocessor_config()))
    ref_rows, ref_grids = reference_rows([image], min_pixels=3136, max_pixels=12845056)
    assert [grid] == ref_grids and rows.dtype == ref_rows.dtype == np.float32
    assert np.array_equal(rows, ref_rows)


@pytest.mark.parity
def test_preprocessing_scales_down_to_max_pixels():
    cfg = ImageConfig(min_pixels=3136, max_pixels=28 * 28 * 12)
    for size in [(451, 300), (90, 700)]:
        image = picture(*size)
        rows, grid = preprocess(image, cfg)
        ref_rows, ref_grids = reference_rows([image], min_pixels=3136, max_pixels=28 * 28 * 12)
        assert [grid] == ref_grids and np.array_equal(rows, ref_rows)
        assert grid[0] * grid[1] * 14 * 14 <= cfg.max_pixels


def test_too_long_a_picture_is_one_usage_line():
    with pytest.raises(UsageError, match=r"1x300 picture is too long and narrow"):
        preprocess(picture(300, 1), ImageConfig())


def test_image_config_reads_both_formats():
    real = preprocessor_config()  # Qwen-Image-Edit's: min/max_pixels at the top and in size
    assert ImageConfig.from_dict(real) == ImageConfig(min_pixels=3136, max_pixels=12845056)
    saved = {k: v for k, v in real.items() if k not in ("min_pixels", "max_pixels")}  # transformers >= 5's
    assert ImageConfig.from_dict(saved) == ImageConfig.from_dict(real)
    assert ImageConfig.from_dict(real | {"max_pixels": 4000}).max_pixels == 4000  # the top-level keys win
    with pytest.raises(ValueError, match="resample=2"):
        ImageConfig.from_dict(real | {"resample": 2})


@pytest.mark.parametrize("change, message", [
    ({"min_pixels": 1e11}, "min_pixels 100000000000.0 is outside 1..12845056"),  # every picture resized to 1e11
    ({"max_pixels": 2**40}, "max_pixels 1099511627776 is outside 1..12845056"),
    ({"max_pixels": float("inf")}, "max_pixels must be a whole number of pixels, not inf"),
    ({"max_pixels": float("nan")}, "max_pixels must be a whole number of pixels, not nan"),
    ({"max_pixels": "big"}, "max_pixels must be a whole number of pixels, not 'big'"),
    ({"min_pixels": True}, "min_pixels must be a whole number of pixels, not True"),
    ({"min_pixels": 0}, "min_pixels 0 is outside"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels 5000 is over max_pixels 4000"),
    ({"min_pixels": None, "max_pixels": None, "size": {"shortest_edge": 3136, "longest_edge": 1e11}},
     "size.longest_edge 100000000000.0 is outside"),  # transformers >= 5's keys named as written
])
def test_absurd_pixel_bounds_are_refused_naming_the_key(change, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        ImageConfig.from_dict(preprocessor_config() | change)
    assert "Qwen-Image-Edit ships min_pixels 3136 and max_pixels 12845056" in str(e.value)
    assert ImageConfig.from_dict(preprocessor_config() | {"max_pixels": 12845056.0}).max_pixels == 12845056


@pytest.fixture(scope="module")
def visual(tiny_edit_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_edit_dir / "text_encoder", dtype=torch.float32)
    return model.eval().model.visual


def tower(folder, cfg=None):
    cfg = cfg or VisionConfig.from_dict(read_config(folder / "text_encoder"))
    return load_module(lambda: VisionTower(cfg), folder / "text_encoder", torch.float32, CPU, remap=vision.remap_keys)


GRIDS = {  # patches; windows are 8x8 patches (4x4 merged tokens)
    "one-window": [(8, 8)],
    "whole-windows": [(16, 24)],
    "partial-windows": [(10, 14)],
    "wide-partial": [(22, 32)],
    "three-images": [(6, 12), (16, 8), (4, 4)],
}


@pytest.mark.parity
@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
def test_vision_tower_equals_transformers(tiny_edit_dir, visual, grids, one_thread):
    torch.manual_seed(0)
    rows = torch.randn(sum(h * w for h, w in grids), 3 * 2 * 14 * 14)
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    with torch.no_grad():
        ref = visual(rows, grid_thw=grid_thw).pooler_output
        ours = tower(tiny_edit_dir)(rows, grids)
    assert ours.shape == (rows.shape[0] // 4, 64)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parity
def test_vision_tower_with_the_wrong_full_attention_block_differs(tiny_edit_dir, visual, one_thread):
    # The check above can fail: full attention in the other block (or none) moves the tokens 10x its tolerance.
    grids = GRIDS["partial-windows"]
    rows = torch.randn(140, 1176, generator=torch.Generator().manual_seed(0))
    ref = visual(rows, grid_thw=torch.tensor([[1, 10, 14]])).pooler_output.detach()
    cfg = VisionConfig.from_dict(read_config(tiny_edit_dir / "text_encoder"))
    for wrong in [(0,), ()]:
        ours = tower(tiny_edit_dir, dataclasses.replace(cfg, fullatt_block_indexes=wrong))(rows, grids)
        assert (ours - ref).abs().max() > 1e-4


def test_both_key_layouts_load(tiny_edit_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_edit_dir / "text_encoder" / "model.safetensors")
    assert any(k.startswith("visual.") for k in state)  # Qwen/Qwen-Image's layout, which transformers still saves
    newer = {k.replace("visual.", "model.visual.", 1): v for k, v in state.items()}  # transformers >= 5's own
    (tmp_path / "text_encoder").mkdir()
    save_file(newer, tmp_path / "text_encoder" / "model.safetensors")
    (tmp_path / "text_encoder" / "config.json").write_text((tiny_edit_dir / "text_encoder" / "config.json").read_text())
    new, old = tower(tiny_edit_dir), tower(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    assert vision.remap_keys("model.language_model.layers.0.mlp.up_proj.weight") is None
    assert vision.remap_keys("lm_head.weight") is None


@pytest.mark.parametrize("layout", ["visual.", "model.visual."])
def test_a_missing_or_non_finite_vision_weight_is_named_as_the_file_names_it(tiny_edit_dir, tmp_path, layout):
    from safetensors.torch import load_file, save_file

    from qimg.errors import QimgError

    state = {k.replace("visual.", layout, 1): v for k, v in
             load_file(tiny_edit_dir / "text_encoder" / "model.safetensors").items()}
    key = layout + "blocks.0.attn.qkv.weight"
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text((tiny_edit_dir / "text_encoder" / "config.json").read_text())
    file = tmp_path / "text_encoder" / "model.safetensors"
    save_file({k: v for k, v in state.items() if k != key}, file)
    with pytest.raises(QimgError, match=f"missing weights {key}$"):
        tower(tmp_path)
    state[key][0, 0] = float("nan")
    save_file(state, file)
    with pytest.raises(QimgError, match=f"{file}: tensor {key} holds NaN or infinity"):
        tower(tmp_path)


def test_real_config_format_reads_the_real_tower():
    # Qwen/Qwen-Image's text_encoder/config.json (transformers 4.x): vision_config with in_chans, no rope entry.
    d = json.loads('{"vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": '
                   '3420, "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, '
                   '"spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112, '
                   '"fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}}')
    assert VisionConfig.from_dict(d) == VisionConfig()
    with pytest.raises(ValueError, match="no vision tower"):
        VisionConfig.from_dict({})


@pytest.mark.parity
def test_keys_match_transformers_at_real_size():
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = VisionConfig()
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "rope_theta"}
    with torch.device("meta"):
        ref = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**fields))
        ours = VisionTower(cfg)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == 676_550_144  # the research notes' count
