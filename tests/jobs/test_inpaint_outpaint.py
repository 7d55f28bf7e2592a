"""`qimg inpaint` / `qimg outpaint` on real photos with the tiny checkpoint: pixels outside the mask are
byte-identical, sizes are preserved, the large-image crop path, strength, the attention mask, bad input."""

import json
import shutil

import numpy as np
import pytest
from helpers import pixels
from PIL import Image

COMMON = ["--steps", "3", "--seed", "4", "--device", "cpu", "--json"]
PHOTO = np.s_[:300, :451]  # the `photo` fixture: an odd-sized 451x300 crop, neither side a multiple of 16


@pytest.mark.slow
def test_inpaint_rect_keeps_every_pixel_outside(tiny_model_dir, photo, tmp_path, cli):
    out = tmp_path / "o.png"
    code, report, err = cli.json("inpaint", photo, "-m", tiny_model_dir, "-p", "a red circle",
                                 "--rect", "100,80,120,90", "-o", out, *COMMON)
    assert code == 0, err
    before, after = pixels(photo), pixels(out)
    assert after.shape == before.shape
    inside = np.zeros(before.shape[:2], bool)
    inside[80:170, 100:220] = True
    assert np.array_equal(after[~inside], before[~inside])
    assert (after[inside] != before[inside]).mean() > 0.5
    assert report["mask_area"] == 120 * 90 and (report["width"], report["height"]) == (451, 300)


@pytest.mark.slow
def test_inpaint_mask_file_with_grow_and_feather_blends_only_inside_the_final_mask(
        tiny_model_dir, photo, tmp_path, cli):
    from qimg import masks

    m = np.zeros((300, 451), np.uint8)
    m[150:200, 300:380] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    out = tmp_path / "o.png"
    code, report, err = cli.json("inpaint", photo, "-m", tiny_model_dir, "-p", "x", "--mask", tmp_path / "m.png",
                                 "--grow", "4", "--feather", "6", "-o", out, *COMMON)
    assert code == 0, err
    final = masks.feather(masks.grow(m.astype(np.float32) / 255, 4), 6)
    before, after = pixels(photo), pixels(out)
    assert np.array_equal(after[final == 0], before[final == 0])
    assert report["mask_area"] == int((final > 0).sum())
    # Pixels at the soft edge lie between the input and the fully regenerated result.
    edge = (final > 0) & (final < 1)
    assert edge.any() and (after[edge] != before[edge]).any()


@pytest.mark.slow
def test_transparent_pixels_of_the_input_are_the_mask(tiny_model_dir, photo, tmp_path, cli):
    rgba = np.dstack([pixels(photo), np.full((300, 451), 255, np.uint8)])
    rgba[20:60, 30:90, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "holey.png")
    code, report, err = cli.json("inpaint", tmp_path / "holey.png", "-m", tiny_model_dir, "-p", "x", *COMMON)
    assert code == 0, err
    assert report["output"] == str(tmp_path / "holey.inpaint.png") and report["mask_area"] == 40 * 60
    after = pixels(tmp_path / "holey.inpaint.png")
    keep = rgba[..., 3] == 255
    assert np.array_equal(after[keep], rgba[..., :3][keep])


@pytest.mark.slow
def test_strength_below_one_stays_closer_to_the_input(tiny_model_dir):
    # In latent space: the tiny VAE has random weights, so its pixels cannot show closeness to the input.
    import torch

    from qimg.engine.engine import Engine
    from qimg.engine.request import Sampling

    engine = Engine(tiny_model_dir, "cpu", "float32")
    z0 = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 12)
    mask[2:6, 4:10] = 1
    distance = {}
    for strength in (1.0, 0.5, 0.1):
        z = engine.inpaint_latent(z0, mask, Sampling("x", " ", 10, 4.0, 3, strength))
        assert torch.equal(z[..., mask == 0], z0[..., mask == 0])
        distance[strength] = (z - z0)[..., mask == 1].abs().mean().item()
    assert distance[0.1] < distance[0.5] < distance[1.0]


@pytest.mark.slow
def test_attention_mask_on_is_also_exact_outside(tiny_model_dir, photo, tmp_path, cli):
    out = tmp_path / "on.png"
    code, report, err = cli.json("inpaint", photo, "-m", tiny_model_dir, "-p", "x", "--rect", "0,0,160,96",
                                 "--attn-mask", "on", "-o", out, *COMMON)
    assert code == 0, err
    assert report["attn_mask"] == "on"
    before, after = pixels(photo), pixels(out)
    assert np.array_equal(after[96:], before[96:]) and np.array_equal(after[:, 160:], before[:, 160:])


@pytest.mark.slow
def test_large_image_is_cropped_around_the_mask(tiny_model_dir, photo, tmp_path, cli):
    """With a working area far smaller than the image, the model runs on the box around the mask only."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "qimg.json").write_text(json.dumps({"max_pixels": 96 * 96}))
    out = tmp_path / "o.png"
    code, report, err = cli.json("inpaint", photo, "-m", model, "-p", "x", "--rect", "300,200,40,30",
                                 "--context", "16", "-o", out, *COMMON)
    assert code == 0, err
    assert report["box"] == [284, 184, 356, 246]
    w, h = report["work_size"]
    assert w * h <= 96 * 96 and w % 16 == 0 and h % 16 == 0
    before, after = pixels(photo), pixels(out)
    inside = np.zeros(before.shape[:2], bool)
    inside[200:230, 300:340] = True
    assert np.array_equal(after[~inside], before[~inside]) and (after[inside] != before[inside]).any()


@pytest.mark.slow
def test_outpaint_keeps_the_original_in_place(tiny_model_dir, photo, tmp_path, cli):
    code, report, err = cli.json("outpaint", photo, "-m", tiny_model_dir, "-p", "a night street",
                                 "--right", "77", "--top", "20", "--feather", "8", *COMMON)
    assert code == 0, err
    out = photo.parent / "astronaut.outpaint.png"
    assert report["output"] == str(out)
    before, after = pixels(photo), pixels(out)
    assert after.shape == (320, 528, 3)
    # The original is untouched except for the feather band along the two grown sides.
    assert np.array_equal(after[20 + 8:, :451 - 8], before[8:, :451 - 8])
    assert (after[:20] != 0).any() and after[:20].std() > 0


@pytest.mark.parametrize("args, fragment", [
    (["--rect", "500,10,10,10"], "outside"),
    (["--rect", "a,b,c,d"], "a,b,c,d"),
    ([], "no mask"),
    (["--mask", "MISSING"], "no such file"),
    (["--rect", "0,0,10,10", "--invert-mask", "--rect", "0,0,100%,100%"], "selects nothing"),
    (["--rect", "0,0,10,10", "--attn-mask", "maybe"], "--attn-mask"),
    (["--rect", "0,0,10,10", "--strength", "0"], "--strength"),
])
def test_bad_inpaint_input_is_one_line_and_writes_nothing(configs_only, photo, tmp_path, cli, args, fragment):
    out = tmp_path / "o.png"
    args = [a.replace("MISSING", str(tmp_path / "nope.png")) for a in args]
    code, _, err = cli.json("inpaint", photo, "-m", configs_only, "-p", "x", "-o", out, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not out.exists()


def test_mask_of_another_size_names_both(configs_only, photo, tmp_path, cli):
    Image.new("L", (100, 80), 255).save(tmp_path / "m.png")
    code, _, err = cli.json("inpaint", photo, "-m", configs_only, "-p", "x", "--mask", tmp_path / "m.png")
    assert code == 2 and "100x80" in err and "451x300" in err


def test_output_equal_to_input_is_refused(configs_only, photo, tmp_path, cli):
    copy = tmp_path / "in.png"
    shutil.copy(photo, copy)
    code, _, err = cli.json("inpaint", copy, "-p", "x", "--rect", "0,0,10,10", "-o", copy, "-m", configs_only)
    assert code == 2 and "is the input image" in err
    assert np.array_equal(pixels(copy), pixels(photo))


def test_outpaint_to_smaller_size_is_refused(configs_only, photo, tmp_path, cli):
    code, _, err = cli.json("outpaint", photo, "-p", "x", "--to", "400x300", "-m", configs_only)
    assert code == 2 and "smaller" in err


def test_not_an_image(configs_only, tmp_path, cli):
    (tmp_path / "fake.png").write_text("hello")
    code, _, err = cli.json("inpaint", tmp_path / "fake.png", "-p", "x", "--rect", "0,0,1,1", "-m", configs_only)
    assert code == 2 and "not an image" in err
