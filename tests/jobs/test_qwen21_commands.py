"""`qimg generate` and `qimg edit` with a Qwen-Image-2.1 folder, end to end through the command line: RGBA
outputs equal to QwenImage21Pipeline's, --background and JPEG, --no-kv-cache and the cache's report in --json,
Turbo's grid, masked edits at odd sizes, the licence notice (once per model folder, silenced by --quiet and
QIMG_NO_NOTICE) and the licence in the metadata and `qimg info`."""

import json

import numpy as np
import pytest
import torch
from helpers import one_line
from PIL import Image
from qwen21_folder import reference_pipeline

from qimg.jobs.metadata import read_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
PROMPT = "a red circle on a blue background"


def qimg(cli, *args):
    """`qimg ARGS --device cpu --no-worker --json`: (exit code, the last JSON line or None, stderr)."""
    code, out, err = cli(*args, "--device", "cpu", "--no-worker", "--json")
    return code, (json.loads(out.splitlines()[-1]) if code == 0 and out else None), err


def picture(path, width: int, height: int, alpha: bool = True):
    yy, xx = np.mgrid[0:height, 0:width]
    disc = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (height / 3) ** 2
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 3 % 255, np.where(disc, 255, 90)], -1)
    image = image.astype(np.uint8) if alpha else image[..., :3].astype(np.uint8)
    Image.fromarray(image).save(path)
    return image


def rgba_of(path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "RGBA"
    return np.asarray(image)


def test_generate_writes_the_reference_rgba_image(cli, qwen21_dir, tmp_path):
    out = tmp_path / "gen.png"
    code, report, err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "96x64", "--steps", "3",
                             "--seed", "7", "-o", out)
    assert code == 0, err
    pipe = reference_pipeline(qwen21_dir)
    reference = pipe(PROMPT, width=96, height=64, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                     output_type="np").images[0]
    reference = (reference * 255).round().astype(np.uint8)
    assert np.abs(rgba_of(out).astype(int) - reference.astype(int)).max() <= 1
    assert report["calls"] == 3 and report["kv_cache"]["on"] and report["kv_cache"]["from_cache"] > 0
    assert report["licence"] == "Qwen Research License" == read_params(out)["licence"]
    code, info, _ = cli("info", out, "--json")
    assert code == 0 and json.loads(info)["licence"] == "Qwen Research License"


def test_no_kv_cache_gives_the_same_image_and_says_so(cli, qwen21_dir, tmp_path):
    runs = {}
    for name, extra in (("on", []), ("off", ["--no-kv-cache"])):
        code, runs[name], err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "64x64", "--steps",
                                     "2", "--seed", "1", "-o", tmp_path / f"{name}.png", *extra)
        assert code == 0, err
    assert np.array_equal(rgba_of(tmp_path / "on.png"), rgba_of(tmp_path / "off.png"))
    on, off = runs["on"]["kv_cache"], runs["off"]["kv_cache"]
    assert not off["on"] and off["from_cache"] == 0 and on["tokens"] + on["from_cache"] == off["tokens"]
    assert runs["on"]["calls"] == runs["off"]["calls"] == 2


def test_jpeg_needs_a_background(cli, qwen21_dir, tmp_path):
    code, _, err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "64x64", "-o", tmp_path / "a.jpg")
    assert code == 2 and not (tmp_path / "a.jpg").exists()
    one_line(err, "JPEG has no transparency", "--background")
    code, _, err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "64x64", "--steps", "2",
                        "-o", tmp_path / "a.jpg", "--background", "white")
    assert code == 0, err
    assert Image.open(tmp_path / "a.jpg").mode == "RGB"
    code, _, err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--background", "no-such-colour")
    assert code == 2
    one_line(err, "--background", "not a colour")


def test_turbo_runs_its_own_grid(cli, qwen21_folders, tmp_path):
    code, report, err = qimg(cli, "generate", "-m", qwen21_folders["turbo"], "-p", PROMPT, "--size", "64x64",
                             "-o", tmp_path / "t.png")
    assert code == 0 and err == "", err
    assert report["calls"] == report["steps"] == 4  # the grid's length
    code, report, err = qimg(cli, "generate", "-m", qwen21_folders["turbo"], "-p", PROMPT, "--size", "64x64",
                             "--steps", "9", "-o", tmp_path / "t9.png")
    assert code == 0 and report["calls"] == report["steps"] == 4
    one_line(err, "samples its own 4-step grid", "--steps 9 does not apply")


def test_edit_with_three_pictures_matches_the_reference(cli, qwen21_dir, tmp_path):
    first = picture(tmp_path / "a.png", 64, 64)
    second = picture(tmp_path / "b.png", 80, 48, alpha=False)
    third = picture(tmp_path / "c.png", 48, 96)
    out = tmp_path / "edited.png"
    code, report, err = qimg(cli, "edit", tmp_path / "a.png", "--ref", tmp_path / "b.png", "--ref",
                             tmp_path / "c.png", "-m", qwen21_dir, "-p", "put the cat from picture 2 on the table",
                             "--edit-area", "4096", "--steps", "3", "--seed", "5", "-o", out)
    assert code == 0, err
    assert report["work_size"] == [64, 64] and report["model_kind"] == "qwen-image-2.1"
    pipe = reference_pipeline(qwen21_dir)
    reference = pipe("put the cat from picture 2 on the table", image=[Image.fromarray(p) for p in (first, second,
                     third)], width=64, height=64, num_inference_steps=3, output_resolution=64,
                     generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    reference = (reference * 255).round().astype(np.uint8)
    assert np.abs(rgba_of(out).astype(int) - reference.astype(int)).max() <= 1


def test_masked_edit_keeps_the_input_outside_the_mask(cli, qwen21_dir, tmp_path):
    image = picture(tmp_path / "odd.png", 77, 51)
    out = tmp_path / "odd.edit.png"
    code, report, err = qimg(cli, "edit", tmp_path / "odd.png", "-m", qwen21_dir, "-p", "make the sky orange",
                             "--rect", "10,5,30,20", "--edit-area", "4096", "--steps", "2", "-o", out)
    assert code == 0, err
    result = rgba_of(out)
    outside = np.ones(image.shape[:2], bool)
    outside[5:25, 10:40] = False
    assert result.shape == image.shape and np.array_equal(result[outside], image[outside])
    assert not np.array_equal(result[~outside], image[~outside])


@pytest.mark.parametrize("args, fragment", [
    (["--vision-area", "4096"], "--vision-area is for Qwen-Image-Edit-2509/2511"),
    (["--ref"] * 1 + ["REF"] + ["--ref", "REF"] * 9, "takes up to 10"),
    (["--ref", "THIN"], "thin.png is 402x2: over 200:1"),
])
def test_edit_refusals(cli, qwen21_dir, tmp_path, args, fragment):
    picture(tmp_path / "a.png", 64, 64)
    picture(tmp_path / "thin.png", 402, 2)
    args = [str(tmp_path / {"REF": "a.png", "THIN": "thin.png"}[a]) if a in ("REF", "THIN") else a for a in args]
    code, _, err = qimg(cli, "edit", tmp_path / "a.png", "-m", qwen21_dir, "-p", "make it blue", *args)
    assert code == 2
    one_line(err, fragment)


def test_licence_notice_once_per_model(cli, qwen21_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("QIMG_NO_NOTICE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    run = ["generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "32x32", "--steps", "1"]
    code, _, err = qimg(cli, *run, "--quiet", "-o", tmp_path / "0.png")
    assert code == 0 and err == ""
    code, _, err = qimg(cli, *run, "-o", tmp_path / "1.png")
    assert code == 0
    one_line(err, "Qwen-Image-2.1 is under the Qwen Research License", "non-commercial")
    code, _, err = qimg(cli, *run, "-o", tmp_path / "2.png")
    assert code == 0 and err == ""


@pytest.mark.parametrize("command", [["inpaint", "IMG", "--rect", "0,0,8,8"], ["outpaint", "IMG", "--expand", "16"]])
def test_commands_2_1_does_not_run_yet_are_one_line(cli, qwen21_dir, tmp_path, command):
    picture(tmp_path / "a.png", 64, 64)
    args = [str(tmp_path / "a.png") if a == "IMG" else a for a in command]
    code, out, err = cli(*args, "-p", "x", "-m", qwen21_dir, "--no-worker")
    assert code == 2
    one_line(err, "does not run Qwen-Image-2.1 models yet")


def test_a_chain_of_edits_is_the_edits_one_after_the_other(cli, qwen21_dir, tmp_path):
    from qimg.jobs.chain_plan import step_seed

    picture(tmp_path / "a.png", 64, 64)
    picture(tmp_path / "ref.png", 64, 32, alpha=False)
    (tmp_path / "c.yaml").write_text(
        "edit_area: 4096\nsteps: 2\nedits:\n  - edit: {prompt: make the sky orange}\n"
        f"  - edit: {{prompt: put the cat from picture 2 there, rect: '8,8,30,20', ref: [{tmp_path / 'ref.png'}]}}\n")
    code, report, err = qimg(cli, "chain", tmp_path / "a.png", tmp_path / "c.yaml", "--seed", "7", "-m", qwen21_dir,
                             "-o", tmp_path / "chained.png")
    assert code == 0, err
    assert [entry["cache"] for entry in report["lineage"]] == ["miss", "miss"]
    one = ["--edit-area", "4096", "--steps", "2", "-m", qwen21_dir]
    code, _, err = qimg(cli, "edit", tmp_path / "a.png", "-p", "make the sky orange", "--seed", step_seed(7, 1),
                        *one, "-o", tmp_path / "1.png")
    assert code == 0, err
    code, _, err = qimg(cli, "edit", tmp_path / "1.png", "-p", "put the cat from picture 2 there", "--rect",
                        "8,8,30,20", "--ref", tmp_path / "ref.png", "--seed", step_seed(7, 2), *one,
                        "-o", tmp_path / "2.png")
    assert code == 0, err
    assert np.array_equal(rgba_of(tmp_path / "chained.png"), rgba_of(tmp_path / "2.png"))
    code, report, err = qimg(cli, "chain", tmp_path / "a.png", tmp_path / "c.yaml", "--seed", "7", "-m", qwen21_dir,
                             "-o", tmp_path / "again.png")
    assert code == 0 and [entry["cache"] for entry in report["lineage"]] == ["hit", "hit"] and report["calls"] == 0
    assert np.array_equal(rgba_of(tmp_path / "again.png"), rgba_of(tmp_path / "chained.png"))
    (tmp_path / "bad.yaml").write_text("edits:\n  - inpaint: {prompt: x, rect: '0,0,8,8'}\n")
    code, _, err = qimg(cli, "chain", tmp_path / "a.png", tmp_path / "bad.yaml", "-m", qwen21_dir)
    assert code == 2
    one_line(err, "runs `edit:` steps in a chain, not inpaint")


def test_the_caches_key_the_template_and_every_pictures_pixels(cli, qwen21_dir, tmp_path):
    picture(tmp_path / "a.png", 64, 64)
    picture(tmp_path / "b.png", 64, 32)
    run = ["edit", tmp_path / "a.png", "--ref", tmp_path / "b.png", "-m", qwen21_dir, "-p", "make it blue",
           "--edit-area", "4096", "--steps", "1", "--overwrite", "-o", tmp_path / "out.png"]
    reports = []
    for _ in range(2):
        code, report, err = qimg(cli, *run)
        assert code == 0, err
        reports.append(report)
    assert [(r["prompt_cache"], r["latent_cache"]) for r in reports] == [("miss", "miss"), ("hit", "hit")]
    image = np.asarray(Image.open(tmp_path / "b.png")).copy()
    image[0, 0, 3] ^= 1  # one alpha value: the picture the text encoder sees changed
    Image.fromarray(image).save(tmp_path / "b.png")
    code, report, err = qimg(cli, *run)
    assert code == 0 and report["prompt_cache"] == "miss", err


@pytest.mark.parity
def test_a_lora_gives_the_references_fused_image(cli, qwen21_dir, tmp_path):
    from safetensors.torch import save_file

    from qimg.model.transformer21 import QwenImage21Transformer
    from qimg.weights.adapters import targets
    from qimg.weights.qwen21 import transformer21_config

    with torch.device("meta"):
        layers = targets(QwenImage21Transformer(transformer21_config(qwen21_dir)))
    g = torch.Generator().manual_seed(4)
    tensors = {f"transformer.{m}.lora_{ab}.weight": 0.3 * torch.randn(shape, generator=g)
               for m, (o, i) in layers.items() for ab, shape in (("A", (4, i)), ("B", (o, 4)))}
    save_file(tensors, tmp_path / "style.safetensors", {"lora_adapter_metadata": json.dumps(
        {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.target_modules": sorted(layers)})})
    out = tmp_path / "lora.png"
    code, report, err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "64x64", "--steps", "2",
                             "--seed", "3", "--lora", f"{tmp_path / 'style.safetensors'}:0.8", "-o", out)
    assert code == 0, err
    pipe = reference_pipeline(qwen21_dir)
    pipe.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    pipe.fuse_lora(adapter_names=["style"], lora_scale=1.0)
    reference = pipe(PROMPT, width=64, height=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                     output_type="np").images[0]
    reference = (reference * 255).round().astype(np.uint8)
    assert np.abs(rgba_of(out).astype(int) - reference.astype(int)).max() <= 1
    code, plain, err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "64x64", "--steps", "2",
                            "--seed", "3", "-o", tmp_path / "plain.png")
    assert np.abs(rgba_of(tmp_path / "plain.png").astype(int) - reference.astype(int)).max() > 8


def test_a_single_file_transformer_gives_the_folders_image(cli, qwen21_dir, tmp_path):
    """A ComfyUI-style single file (gate and up fused, `model.diffusion_model.` prefix) in float32."""
    from safetensors.torch import load_file, save_file

    weights = {}
    for file in sorted((qwen21_dir / "transformer").glob("*.safetensors")):
        weights.update(load_file(file))
    fused = {}
    for key, t in weights.items():
        if key.endswith(".img_mlp.proj.weight"):
            continue
        if key.endswith(".img_mlp.gate_layer.weight"):
            up = weights[key.replace("gate_layer", "proj")]
            key, t = key.replace("gate_layer", "gate_up"), torch.cat([t, up])
        fused[f"model.diffusion_model.{key}"] = t.contiguous()
    save_file(fused, tmp_path / "qwen_image_2.1_fp32.safetensors")
    runs = {}
    for name, extra in (("folder", []), ("file", ["--transformer", tmp_path / "qwen_image_2.1_fp32.safetensors"])):
        code, runs[name], err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "64x64", "--steps",
                                     "2", "--seed", "2", "-o", tmp_path / f"{name}.png", *extra)
        assert code == 0, err
    assert np.array_equal(rgba_of(tmp_path / "folder.png"), rgba_of(tmp_path / "file.png"))
    assert runs["file"]["transformer"]["name"] == "qwen_image_2.1_fp32.safetensors"


@pytest.mark.parametrize("size, fragment", [("48x64", "width 48 must be a positive multiple of 32"),
                                            ("4096x2048", "over Qwen-Image-2.1's largest size")])
def test_sizes_2_1_cannot_take_are_one_line(cli, qwen21_dir, tmp_path, size, fragment):
    code, _, err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", size, "-o", tmp_path / "x.png")
    assert code == 2 and not (tmp_path / "x.png").exists()
    one_line(err, fragment)


def test_cfg_without_a_negative_prompt_samples_unguided_with_a_warning(cli, qwen21_dir, tmp_path):
    code, report, err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "32x32", "--steps", "2",
                             "--cfg", "4", "-o", tmp_path / "x.png")
    assert code == 0 and report["calls"] == 2  # one pass a step: no guidance
    one_line(err, "--cfg 4 needs --negative-prompt", "sampling without guidance")
    code, report, err = qimg(cli, "generate", "-m", qwen21_dir, "-p", PROMPT, "--size", "32x32", "--steps", "2",
                             "--cfg", "4", "--negative-prompt", "blurry", "-o", tmp_path / "y.png")
    assert code == 0 and report["calls"] == 4 and err == ""  # both branches, each with its own cache


def test_an_edit_area_the_vision_processor_would_resize_is_one_line(cli, qwen21_dir, tmp_path):
    picture(tmp_path / "a.png", 64, 64)
    code, _, err = qimg(cli, "edit", tmp_path / "a.png", "-m", qwen21_dir, "-p", "make it blue", "--edit-area",
                        str(512 * 512), "-o", tmp_path / "b.png")
    assert code == 2 and not (tmp_path / "b.png").exists()
    one_line(err, "--edit-area 262144", "over its largest area for the vision processor")


def test_an_edit_batch_writes_rgba_outputs_and_previews(cli, qwen21_dir, tmp_path):
    (tmp_path / "in").mkdir()
    for name, size in (("a", (64, 64)), ("b", (64, 32))):
        picture(tmp_path / "in" / f"{name}.png", *size)
    code, out, err = cli("edit", tmp_path / "in", "-m", qwen21_dir, "-p", "make it blue", "--edit-area", "4096",
                         "--steps", "2", "--seed", "1", "--out-dir", tmp_path / "out", "--preview", tmp_path / "prev",
                         "--device", "cpu", "--no-worker", "--json")
    assert code == 0, err
    assert len(out.splitlines()) == 2
    for name, size in (("a", (64, 64)), ("b", (64, 32))):
        result = rgba_of(tmp_path / "out" / f"{name}.edit.png")
        assert result.shape == (size[1], size[0], 4)
        assert np.array_equal(rgba_of(tmp_path / "prev" / f"{name}.edit.png"), result)  # the last preview: the result


def test_mask_crop_edits_the_box_and_keeps_the_rest(cli, qwen21_dir, tmp_path):
    image = picture(tmp_path / "big.png", 200, 120)
    code, report, err = qimg(cli, "edit", tmp_path / "big.png", "-m", qwen21_dir, "-p", "make it blue", "--rect",
                             "100,40,30,20", "--mask-crop", "17", "--edit-area", "4096", "--steps", "1",
                             "-o", tmp_path / "out.png")
    assert code == 0, err
    assert report["box"] == [83, 23, 147, 77] and report["mask_crop"] == 17
    result = rgba_of(tmp_path / "out.png")
    outside = np.ones(image.shape[:2], bool)
    outside[40:60, 100:130] = False
    assert np.array_equal(result[outside], image[outside]) and not np.array_equal(result[~outside], image[~outside])
