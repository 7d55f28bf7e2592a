"""`qimg edit` against the diffusers edit pipelines on the tiny Edit checkpoints (CPU, float32): PNGs within 1 of
QwenImageEditPipeline, QwenImageEditPlusPipeline (2509, 2511) and QwenImageEditInpaintPipeline, the output at
the input's size, chains that carry the latent, and the cache keyed by the pictures."""

import json

import numpy as np
import pytest
import torch
from helpers import pixels
from PIL import Image
from skimage import data
from tiny_edit_checkpoint import reference_edit_pipeline, small_areas

from qimg.engine.engine import Engine
from qimg.engine.instruct import calculate_dimensions
from qimg.jobs.metadata import read_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
VISION_AREA = 64 * 64


def qimg(cli, *args):
    """`qimg ARGS --device cpu --no-worker`: (exit code, the last line of stdout as JSON or None, stderr)."""
    code, out, err = cli(*args, "--device", "cpu", "--no-worker")
    return code, (json.loads(out.splitlines()[-1]) if code == 0 and out else None), err


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Pictures of different aspects; the first two have sides that are multiples of 32, so at an edit area of
    their own size the model works on them unresampled and the reference's output is comparable 1:1."""
    folder = tmp_path_factory.mktemp("pictures")
    crops = {"wide": ((0, 0, 400, 240), (160, 96)), "tall": ((100, 0, 340, 320), (96, 128)),
             "ref1": ((200, 100, 400, 400), (64, 96)), "ref2": ((0, 200, 300, 500), (128, 128)),
             "odd": ((0, 0, 451, 300), (451, 300))}
    paths = {}
    for name, (box, size) in crops.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(data.astronaut()).crop(box).resize(size, Image.LANCZOS).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def pipelines(tiny_edit_checkpoints):
    """The reference pipelines, built once: {"edit", "plus", "2511", "inpaint"}."""
    from diffusers import QwenImageEditInpaintPipeline

    pipes = {kind: reference_edit_pipeline(folder) for kind, folder in tiny_edit_checkpoints.items()}
    pipes["inpaint"] = QwenImageEditInpaintPipeline(**pipes["edit"].components)
    pipes["inpaint"].set_progress_bar_config(disable=True)
    return pipes


def assert_close(ours: np.ndarray, ref: np.ndarray, where=None):
    assert ours.shape == ref.shape
    ours, ref = ours.astype(int), ref.astype(int)
    if where is not None:
        ours, ref = ours[where], ref[where]
    assert ref.std() > 1  # a flat image would make the comparison meaningless
    assert np.abs(ours - ref).max() <= 1


@pytest.mark.parity
@pytest.mark.parametrize("picture, seed, cfg, steps", [("wide", 7, 4.0, 3), ("tall", 3, 1.0, 2)])
def test_edit_matches_pipeline(tiny_edit_dir, pipelines, photos, tmp_path, cli, monkeypatch,
                               picture, seed, cfg, steps):
    image = pixels(photos[picture])
    area = image.shape[0] * image.shape[1]
    small_areas(monkeypatch, area, VISION_AREA)
    out = tmp_path / "o.png"
    code, report, err = qimg(cli, "edit", photos[picture], "-m", tiny_edit_dir, "-p", "把衣服改成红色",
                             "--edit-area", area, "--steps", steps, "--cfg", cfg, "--seed", seed, "-o", out, "--json")
    assert code == 0, err
    assert report["work_size"] == [image.shape[1], image.shape[0]] and report["model_kind"] == "edit"
    assert report["calls"] == steps * (2 if cfg > 1 else 1)
    ref = pipelines["edit"](image=Image.fromarray(image), prompt="把衣服改成红色", negative_prompt=" ",
                            true_cfg_scale=cfg, num_inference_steps=steps,
                            generator=torch.Generator().manual_seed(seed)).images[0]
    assert_close(pixels(out), np.asarray(ref))


@pytest.mark.parity
@pytest.mark.parametrize("kind, refs", [("plus", []), ("plus", ["ref1"]), ("plus", ["ref1", "ref2"]),
                                        ("2511", ["ref2"])], ids=["2509-1", "2509-2", "2509-3", "2511-2"])
def test_plus_matches_pipeline(tiny_edit_checkpoints, pipelines, photos, tmp_path, cli, monkeypatch, kind, refs):
    image = pixels(photos["wide"])
    area = image.shape[0] * image.shape[1]
    small_areas(monkeypatch, area, VISION_AREA)
    out = tmp_path / "o.png"
    ref_args = [a for r in refs for a in ("--ref", photos[r])]
    code, report, err = qimg(cli, "edit", photos["wide"], *ref_args, "-m", tiny_edit_checkpoints[kind], "-p",
                             "put the lamp from picture 2 on the table", "--edit-area", area, "--vision-area",
                             VISION_AREA, "--steps", 2, "--seed", 11, "-o", out, "--json")
    assert code == 0, err
    assert len(report["pictures_sha256"]) == 1 + len(refs)
    assert report["model_kind"] == ("edit-2511" if kind == "2511" else "edit-2509")
    # the reference's output follows the last picture's aspect by default: give it ours, the input's
    ref = pipelines[kind](image=[Image.fromarray(pixels(p)) for p in [photos["wide"], *(photos[r] for r in refs)]],
                          prompt="put the lamp from picture 2 on the table", negative_prompt=" ", true_cfg_scale=4.0,
                          num_inference_steps=2, height=image.shape[0], width=image.shape[1],
                          generator=torch.Generator().manual_seed(11)).images[0]
    assert_close(pixels(out), np.asarray(ref))


@pytest.mark.parity
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_masked_edit_matches_edit_inpaint_pipeline(tiny_edit_dir, pipelines, photos, tmp_path, cli, monkeypatch,
                                                   strength):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as inpaint

    image = pixels(photos["wide"])
    area = image.shape[0] * image.shape[1]
    small_areas(monkeypatch, area, VISION_AREA)
    # The reference samples its VAE encoding (drawing from the generator before the noise); qimg takes the mode.
    retrieve = inpaint.retrieve_latents
    monkeypatch.setattr(inpaint, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        retrieve(out, generator, "argmax"))
    out = tmp_path / "o.png"
    code, report, err = qimg(cli, "edit", photos["wide"], "-m", tiny_edit_dir, "-p", "a red hat",
                             "--rect", "32,16,64,48", "--strength", strength, "--edit-area", area, "--steps", 4,
                             "--seed", 5, "-o", out, "--json")
    assert code == 0, err
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[16:64, 32:96] = 255
    ref = pipelines["inpaint"](image=Image.fromarray(image), mask_image=Image.fromarray(mask), prompt="a red hat",
                               negative_prompt=" ", true_cfg_scale=4.0, strength=strength, num_inference_steps=4,
                               generator=torch.Generator().manual_seed(5)).images[0]
    ours, inside = pixels(out), mask > 0
    assert_close(ours, np.asarray(ref), inside)
    assert np.array_equal(ours[~inside], image[~inside])  # the input's bytes; the reference decodes them
    assert report["mask_area"] == inside.sum()


def test_output_keeps_odd_input_sizes_and_cache_keys_on_pictures(tiny_plus_dir, photos, tmp_path, cli):
    area = 160 * 96
    common = ["-m", tiny_plus_dir, "-p", "make it night", "--edit-area", area, "--vision-area", VISION_AREA,
              "--steps", 1, "--cfg", 1, "--seed", 2, "--json", "--overwrite"]
    code, report, err = qimg(cli, "edit", photos["odd"], "-o", tmp_path / "a.png", *common)
    assert code == 0, err
    assert pixels(tmp_path / "a.png").shape == (300, 451, 3)
    assert report["work_size"] == list(calculate_dimensions(area, 451 / 300)) == [160, 96]
    assert (report["latent_cache"], report["prompt_cache"]) == ("miss", "miss")

    code, report, err = qimg(cli, "edit", photos["odd"], "-o", tmp_path / "b.png", *common)
    assert (report["latent_cache"], report["prompt_cache"]) == ("hit", "hit")
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))

    changed = pixels(photos["odd"]).copy()
    changed[:40, :40] = 255 - changed[:40, :40]  # the same instruction must be encoded again with the new picture
    Image.fromarray(changed).save(tmp_path / "changed.png")
    code, report, err = qimg(cli, "edit", tmp_path / "changed.png", "-o", tmp_path / "c.png", *common)
    assert (report["latent_cache"], report["prompt_cache"]) == ("miss", "miss")

    code, report, err = qimg(cli, "edit", photos["odd"], "-o", tmp_path / "d.png", "--size", "100x50", *common)
    assert code == 0, err
    assert pixels(tmp_path / "d.png").shape == (50, 100, 3)
    assert report["work_size"] == list(calculate_dimensions(area, 2))


def test_chain_of_edits_keeps_outside_pixels_and_encodes_once(tiny_plus_dir, photos, tmp_path, cli, monkeypatch):
    encoded, encode = [], Engine.encode
    monkeypatch.setattr(Engine, "encode", lambda self, image: encoded.append(image.shape) or encode(self, image))
    (tmp_path / "chain.yaml").write_text(
        "steps: 2\ncfg: 1\nedit_area: 15360\nvision_area: 4096\nedits:\n"
        '  - edit: {prompt: "a red hat", rect: "0,0,120,90"}\n'
        '  - edit: {prompt: "a blue sky", rect: "300,20,100,100", feather: 8}\n'
        '  - edit: {prompt: "brighter", rect: "150,150,200,100", strength: 0.6, steps: 3}\n')
    out = tmp_path / "c.png"
    code, report, err = qimg(cli, "chain", photos["odd"], tmp_path / "chain.yaml", "-m", tiny_plus_dir,
                             "--seed", 4, "-o", out, "--json")
    assert code == 0, err
    assert len(encoded) == 1  # the input, once: every later edit starts from the carried latent
    before, after = pixels(photos["odd"]), pixels(out)
    touched = np.zeros(before.shape[:2], bool)
    touched[0:90, 0:120] = touched[12:128, 292:408] = touched[150:250, 150:350] = True  # the rects, feather included
    assert np.array_equal(after[~touched], before[~touched])
    assert np.abs(after[touched].astype(int) - before[touched]).max() > 10
    seeds = [entry["seed"] for entry in report["lineage"]]
    assert len(set(seeds)) == 3 and 4 not in seeds  # each edit its own seed, derived from the chain's

    # Run again: every edit comes from the cache (the chained keys cover the pictures), the same PNG results.
    again = tmp_path / "again.png"
    code, report, err = qimg(cli, "chain", photos["odd"], tmp_path / "chain.yaml", "-m", tiny_plus_dir,
                             "--seed", 4, "-o", again, "--json")
    assert code == 0, err
    assert [entry["cache"] for entry in report["lineage"]] == ["hit"] * 3 and len(encoded) == 1
    assert np.array_equal(pixels(again), after)


def test_batch_with_mask_dir(tiny_edit_dir, photos, tmp_path, cli):
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("wide", "odd"):
        image = pixels(photos[name])
        Image.fromarray(image).save(tmp_path / "in" / f"{name}.png")
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[10:40, 20:70] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    code, _, err = qimg(cli, "edit", tmp_path / "in", "--mask-dir", tmp_path / "masks", "--out-dir",
                        tmp_path / "out", "-m", tiny_edit_dir, "-p", "a red hat", "--edit-area", 15360, "--steps", 1,
                        "--cfg", 1, "--seed", 3, "--json")
    assert code == 0, err
    for name in ("wide", "odd"):
        before, after = pixels(photos[name]), pixels(tmp_path / "out" / f"{name}.edit.png")
        inside = pixels(tmp_path / "masks" / f"{name}.png")[..., 0] > 0
        assert after.shape == before.shape and np.array_equal(after[~inside], before[~inside])
        assert np.abs(after[inside].astype(int) - before[inside]).max() > 10
    # --shard: the two shards' outputs are the whole batch's (their pixels and parameters but for the cache's
    # use, a hit now), no file in both
    for i in (0, 1):
        code, _, err = qimg(cli, "edit", tmp_path / "in", "--mask-dir", tmp_path / "masks", "--out-dir",
                            tmp_path / f"shard{i}", "-m", tiny_edit_dir, "-p", "a red hat", "--edit-area", 15360,
                            "--steps", 1, "--cfg", 1, "--seed", 3, "--shard", f"{i}/2", "--json")
        assert code == 0, err
    shards = [sorted(p.name for p in (tmp_path / f"shard{i}").glob("*.png")) for i in (0, 1)]
    assert sorted(shards[0] + shards[1]) == ["odd.edit.png", "wide.edit.png"]
    for i, names in enumerate(shards):
        for name in names:
            ours, whole = (read_params(folder / name) for folder in (tmp_path / f"shard{i}", tmp_path / "out"))
            assert ours.pop("latent_cache") == "hit" and whole.pop("latent_cache") == "miss" and ours == whole
            assert np.array_equal(pixels(tmp_path / f"shard{i}" / name), pixels(tmp_path / "out" / name))


@pytest.mark.parity
def test_2511_latents_match_pipeline(tiny_2511_dir, pipelines, photos, monkeypatch):
    from qimg.engine.canvas import Canvas
    from qimg.engine.instruct import Areas, Pictures, edit_canvas
    from qimg.engine.request import Sampling
    from qimg.model.transformer import patchify

    image, ref = pixels(photos["wide"]), pixels(photos["ref2"])
    area = image.shape[0] * image.shape[1]
    small_areas(monkeypatch, area, VISION_AREA)
    engine = Engine(tiny_2511_dir, "cpu", "float32")
    canvas, encoded = edit_canvas(engine, Canvas.start(image), None, Pictures([ref], Areas(area, VISION_AREA)),
                                  Sampling("picture 2's sky", " ", 3, 3.0, 8))
    expected = pipelines["2511"](image=[Image.fromarray(image), Image.fromarray(ref)], prompt="picture 2's sky",
                                 negative_prompt=" ", true_cfg_scale=3.0, num_inference_steps=3, height=96, width=160,
                                 generator=torch.Generator().manual_seed(8), output_type="latent").images
    assert encoded and canvas.work == (160, 96)
    assert (patchify(canvas.latent) - expected).abs().max() <= 1e-4


def test_editing_an_output_at_the_working_size_reuses_its_latent(tiny_edit_dir, photos, tmp_path, cli):
    common = ["-m", tiny_edit_dir, "--edit-area", 160 * 96, "--steps", 1, "--cfg", 1, "--json"]
    code, report, err = qimg(cli, "edit", photos["wide"], "-p", "a red hat", "-o", tmp_path / "1.png", *common)
    assert code == 0 and report["work_size"] == [160, 96], err
    code, report, err = qimg(cli, "edit", tmp_path / "1.png", "-p", "a blue coat", "-o", tmp_path / "2.png",
                             *common)
    assert code == 0 and report["latent_cache"] == "hit", err  # the first edit's latent: no encoding, no drift
    code, report, err = qimg(cli, "edit", photos["odd"], "-p", "a red hat", "-o", tmp_path / "3.png", *common)
    code, report, err = qimg(cli, "edit", tmp_path / "3.png", "-p", "a blue coat", "-o", tmp_path / "4.png",
                             *common)
    assert code == 0 and report["latent_cache"] == "miss", err  # resampled to 451x300: its latent stands for no output


def test_mask_crop_shows_the_model_only_the_box(tiny_edit_dir, photos, tmp_path, cli):
    code, report, err = qimg(cli, "edit", photos["odd"], "-m", tiny_edit_dir, "-p", "a red hat", "--rect",
                             "300,200,40,30", "--mask-crop", 20, "--edit-area", 64 * 48, "--steps", 1, "--cfg", 1,
                             "-o", tmp_path / "o.png", "--json")
    assert code == 0, err
    assert report["box"] == [280, 180, 360, 250] and report["work_size"] == list(calculate_dimensions(64 * 48, 8 / 7))
    before, after = pixels(photos["odd"]), pixels(tmp_path / "o.png")
    inside = np.zeros(before.shape[:2], bool)
    inside[200:230, 300:340] = True
    assert after.shape == before.shape and np.array_equal(after[~inside], before[~inside])
    assert np.abs(after[inside].astype(int) - before[inside]).max() > 10


@pytest.mark.parametrize("extra", [("--size", "100x50"), ("--rect", "300,200,40,30", "--mask-crop", 20),
                                   ("--rect", "10,10,200,100")])
def test_previews_of_an_edit_look_like_its_output(tiny_plus_dir, photos, tmp_path, cli, extra):
    """Every preview has the output's size and, with a mask, the input's pixels outside it; the last one is the
    output; the output is the same with or without previews."""
    from qimg import images

    written, save = [], images.save_image

    def spy(image, path, *args, **kwargs):
        if path.name == "live.png":
            written.append(np.asarray(image))
        return save(image, path, *args, **kwargs)

    common = ["-m", tiny_plus_dir, "-p", "a red hat", "--edit-area", 160 * 96, "--vision-area", VISION_AREA,
              "--steps", 3, "--cfg", 1, "--seed", 5, *extra, "--json"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images, "save_image", spy)
        code, report, err = qimg(cli, "edit", photos["odd"], "-o", tmp_path / "o.png", "--preview",
                                 tmp_path / "live.png", "--preview-every", 1, *common)
    assert code == 0, err
    assert report["previews"] == 3 == len(written)  # steps 1 and 2, then the result
    code, _, err = qimg(cli, "edit", photos["odd"], "-o", tmp_path / "plain.png", *common)
    assert code == 0, err
    out, before = pixels(tmp_path / "o.png"), pixels(photos["odd"])
    assert np.array_equal(out, pixels(tmp_path / "plain.png"))
    assert np.array_equal(written[-1], out) and Image.open(tmp_path / "live.png").text[images.PREVIEW_CHUNK] == "result"
    assert all(w.shape == out.shape for w in written) and not np.array_equal(written[0], out)
    if "--rect" in extra:
        x, y, w, h = map(int, extra[1].split(","))
        outside = np.ones(before.shape[:2], bool)
        outside[y:y + h, x:x + w] = False
        assert all(np.array_equal(p[outside], before[outside]) for p in written)


def test_a_chain_of_edits_previews_its_canvas(tiny_plus_dir, photos, tmp_path, cli):
    (tmp_path / "chain.yaml").write_text(
        "steps: 2\ncfg: 1\nedit_area: 15360\nvision_area: 4096\nedits:\n"
        '  - edit: {prompt: "a red hat", rect: "0,0,120,90"}\n'
        '  - edit: {prompt: "a blue sky", rect: "300,20,100,100"}\n')
    out, live = tmp_path / "c.png", tmp_path / "live.png"
    code, report, err = qimg(cli, "chain", photos["odd"], tmp_path / "chain.yaml", "-m", tiny_plus_dir,
                             "--seed", 4, "-o", out, "--preview", live, "--preview-every", 1, "--json")
    assert code == 0, err
    assert report["previews"] >= 3 and np.array_equal(pixels(live), pixels(out))
