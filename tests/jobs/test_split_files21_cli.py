"""Qwen-Image-2.1 from ComfyUI's split files (transformer, Qwen3-VL text encoder with its vision tower, RGBA VAE)
with no model folder: generate and edit give the folder's bytes (the same tensors in the same dtype), Turbo is
told by the transformer file's name and samples its grid, scaled fp8 equals a folder of its dequantized weights,
a wrong combination is one line before any weights load, and -m on a ComfyUI models folder (2.1's files, and the
20B model's beside them) finds the parts each transformer takes. The configs qimg ships for the real models are
replaced by the tiny folders' (weights.shipped.CONFIGS), as the files are the tiny model's."""

import json
import shutil

import numpy as np
import pytest
from helpers import one_line
from PIL import Image
from safetensors.torch import load_file, save_file
from split_layouts import folder_tensors, gguf_text_encoder, wan_vae
from split_layouts21 import TOKENIZER_FILES, files21, scaled_fp8_text_encoder21, text_encoder21, vision21

from qimg.errors import UsageError
from qimg.jobs.metadata import read_params
from qimg.weights.comfy_folder import pick

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
RUN = ["--steps", "2", "--seed", "5", "--device", "cpu", "--no-cache", "--no-worker", "--json"]
PROMPT = "a red circle on a blue background"


@pytest.fixture
def shipped(tmp_path_factory, qwen21_folders, tiny_model_dir, monkeypatch):
    """Config-only copies of the tiny folders (no weights, no tokenizer), as qimg ships the real ones."""
    root = tmp_path_factory.mktemp("configs")
    ignore = shutil.ignore_patterns("*.safetensors*", "tokenizer", *TOKENIZER_FILES)
    for name, folder in (("qwen-image", tiny_model_dir), ("qwen-image-2.1", qwen21_folders["base"]),
                         ("qwen-image-2.1-turbo", qwen21_folders["turbo"])):
        shutil.copytree(folder, root / name, ignore=ignore)
    monkeypatch.setattr("qimg.weights.shipped.CONFIGS", root)
    return root


@pytest.fixture(scope="module")
def files(qwen21_folders, tmp_path_factory):
    return files21(qwen21_folders["base"], tmp_path_factory.mktemp("files21"))


def split(transformer, text_encoder, vae, *more):
    return ["--transformer", transformer, "--text-encoder", text_encoder, "--vae", vae, *more]


def run(cli, *args):
    code, out, err = cli(*args, *RUN)
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


def rgba(path):
    return np.asarray(Image.open(path))


def test_generate_from_three_files_gives_the_folders_bytes(cli, qwen21_folders, files, tmp_path, shipped):
    size = ["--size", "64x32"]
    run(cli, "generate", "-p", PROMPT, "-m", qwen21_folders["base"], *size, "-o", tmp_path / "folder.png")
    report = run(cli, "generate", "-p", PROMPT, *split(*files), *size, "-o", tmp_path / "files.png")
    assert np.array_equal(rgba(tmp_path / "folder.png"), rgba(tmp_path / "files.png"))
    assert report["variant"] == "qwen-image-2.1" and report["model"] == str(shipped / "qwen-image-2.1")
    assert report["text_encoder"]["name"] == files[1].name and report["text_encoder"]["format"] == "safetensors F32"
    assert report["text_encoder"]["tokenizer"] == "qwen25_tokenizer/ beside the file"
    assert report["vae"]["name"] == files[2].name and len(report["vae"]["sha256"]) == 64
    assert read_params(tmp_path / "files.png")["licence"] == "Qwen Research License"
    # ComfyUI's own module names (model.*, visual.*), and -m with one part replaced, give the same bytes
    comfy = text_encoder21(qwen21_folders["base"], tmp_path / "qwen3vl_comfy.safetensors", comfy=True)
    shutil.copytree(files[1].parent / "qwen25_tokenizer", tmp_path / "qwen25_tokenizer")
    run(cli, "generate", "-p", PROMPT, *split(files[0], comfy, files[2]), *size, "-o", tmp_path / "comfy.png")
    run(cli, "generate", "-p", PROMPT, "-m", qwen21_folders["base"], "--vae", files[2], *size,
        "-o", tmp_path / "vae.png")
    for name in ("comfy", "vae"):
        assert np.array_equal(rgba(tmp_path / "folder.png"), rgba(tmp_path / f"{name}.png")), name


def test_turbo_by_the_transformer_files_name_and_info(cli, qwen21_folders, files, tmp_path, shipped):
    turbo = files[0].with_name("qwen_image_2.1_turbo_fp32.safetensors")
    shutil.copy(files[0], turbo)
    run(cli, "generate", "-p", PROMPT, "-m", qwen21_folders["turbo"], "--size", "32x32", "-o", tmp_path / "a.png")
    report = run(cli, "generate", "-p", PROMPT, *split(turbo, *files[1:]), "--size", "32x32", "-o", tmp_path / "b.png")
    assert report["variant"] == "qwen-image-2.1-turbo" and report["steps"] == 4  # the grid's length
    assert np.array_equal(rgba(tmp_path / "a.png"), rgba(tmp_path / "b.png"))
    infos = []
    for file in (turbo, files[1]):
        code, out, err = cli("info", file, "--json")
        assert code == 0, err
        infos.append(json.loads(out))
    assert infos[0]["variant"] == "qwen-image-2.1-turbo" and infos[0]["text_width"] == 64
    assert infos[1] | {"format": ""} == {"file": files[1].name, "part": "text encoder", "option": "--text-encoder",
                                         "format": "", "model": "Qwen3-VL (Qwen-Image-2.1)", "width": 64, "layers": 2,
                                         "vision_tower": True, "tokenizer": "qwen25_tokenizer/ beside the file"}


def test_edit_from_files_with_a_separate_vision_file(cli, qwen21_folders, files, tmp_path, shipped):
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 4, xx + yy, 200 + 0 * xx], -1).astype(np.uint8)).save(tmp_path / "in.png")
    edit = ["edit", tmp_path / "in.png", "-p", "make the sky orange", "--edit-area", "4096"]
    run(cli, *edit, "-m", qwen21_folders["base"], "-o", tmp_path / "folder.png")
    run(cli, *edit, *split(*files), "-o", tmp_path / "files.png")
    text_only = text_encoder21(qwen21_folders["base"], files[1].with_name("text_only.safetensors"), vision=False)
    tower = vision21(qwen21_folders["base"], tmp_path / "vision.safetensors")
    report = run(cli, *edit, *split(files[0], text_only, files[2], "--vision", tower), "-o", tmp_path / "vision.png")
    assert report["vision"]["name"] == "vision.safetensors"
    for name in ("files", "vision"):
        assert np.array_equal(rgba(tmp_path / "folder.png"), rgba(tmp_path / f"{name}.png")), name


def test_scaled_fp8_text_encoder_gives_a_folder_of_its_weights(cli, qwen21_folders, files, tmp_path, shipped):
    fp8 = files[1].with_name("qwen3vl_8b_fp8_scaled.safetensors")
    held = scaled_fp8_text_encoder21(qwen21_folders["base"], fp8)
    folder = tmp_path / "dequantized"
    shutil.copytree(qwen21_folders["base"], folder)
    for old in (folder / "text_encoder").glob("*.safetensors*"):
        old.unlink()
    save_file({k: v.contiguous() for k, v in held.items()}, str(folder / "text_encoder" / "model.safetensors"))
    run(cli, "generate", "-p", PROMPT, "-m", folder, "--size", "32x32", "-o", tmp_path / "folder.png")
    report = run(cli, "generate", "-p", PROMPT, *split(files[0], fp8, files[2]), "--size", "32x32",
                 "-o", tmp_path / "fp8.png")
    assert "F8_E4M3" in report["text_encoder"]["format"]
    assert np.abs(rgba(tmp_path / "folder.png").astype(int) - rgba(tmp_path / "fp8.png").astype(int)).max() <= 1


def test_refusals_are_one_line_before_loading(cli, qwen21_folders, tiny_model_dir, files, tmp_path, shipped,
                                              monkeypatch):
    loads = []
    monkeypatch.setattr("qimg.weights.split21.load_encoder21", lambda *a, **k: loads.append(a))
    monkeypatch.setattr("qimg.weights.transformer.load_transformer", lambda *a, **k: loads.append(a))
    base = qwen21_folders["base"]
    qwen25 = text_encoder21(tiny_model_dir, tmp_path / "qwen_2.5_vl_7b.safetensors")
    wan = tmp_path / "qwen_image_vae.safetensors"
    wan_vae(tiny_model_dir, wan)
    vae16 = tmp_path / "vae16.safetensors"
    save_file(folder_tensors(tiny_model_dir / "vae"), str(vae16))
    twenty = tmp_path / "qwen_image_fp32.safetensors"
    save_file(folder_tensors(tiny_model_dir / "transformer"), str(twenty))
    no_vision = text_encoder21(base, files[1].with_name("no_vision.safetensors"), vision=False)
    alone = tmp_path / "alone" / "qwen3vl.safetensors"
    alone.parent.mkdir()
    shutil.copy(files[1], alone)
    gguf = tmp_path / "Qwen3-VL-8B-F32.gguf"
    gguf_text_encoder(tiny_model_dir, gguf)
    cases = [
        (split(files[0], qwen25, files[2]), "not a Qwen3-VL text encoder"),
        (split(files[0], files[1], wan), "Wan-style VAE names"),
        (split(files[0], files[1], vae16), "latents of 16 channels"),
        (split(twenty, files[1], wan), "a Qwen3-VL text encoder (Qwen-Image-2.1's)"),
        (split(files[0], no_vision, files[2]), "no vision tower"),
        (split(files[0], alone, files[2]), "no tokenizer for it"),
        (split(files[0], gguf, files[2]), "not llama.cpp GGUF"),
        (split(files[0], files[2], files[2]), "holds a VAE's weights"),
    ]
    for args, fragment in cases:
        code, _, err = cli("generate", "-p", PROMPT, *args, "--size", "32x32", "-o", tmp_path / "x.png", *RUN)
        assert code == 2, (fragment, err)
        one_line(err, fragment)
    assert loads == [] and not (tmp_path / "x.png").exists()


def comfy_folder(models, parts):
    """ComfyUI's models folder: {subfolder: [files]} copied in, a text encoder's qwen25_tokenizer/ beside it."""
    for sub, paths in parts.items():
        (models / sub).mkdir(parents=True, exist_ok=True)
        for f in paths:
            shutil.copy(f, models / sub / f.name)
            if (f.parent / "qwen25_tokenizer").is_dir() and not (models / sub / "qwen25_tokenizer").exists():
                shutil.copytree(f.parent / "qwen25_tokenizer", models / sub / "qwen25_tokenizer")
    return models


def test_model_on_a_comfyui_folder_of_21_and_20b_files(cli, qwen21_folders, tiny_model_dir, files, tmp_path,
                                                        shipped):
    """-m on ComfyUI's models folder takes 2.1's parts (same bytes as the three files); with the 20B model's files
    beside them each transformer takes its own family's text encoder and VAE, and what stays ambiguous is listed."""
    size = ["--size", "32x32"]
    models = comfy_folder(tmp_path / "ComfyUI" / "models", {"diffusion_models": [files[0]],
                                                           "text_encoders": [files[1]], "vae": [files[2]]})
    run(cli, "generate", "-p", PROMPT, *split(*files), *size, "-o", tmp_path / "files.png")
    report = run(cli, "generate", "-p", PROMPT, "-m", models, *size, "-o", tmp_path / "comfy.png")
    assert np.array_equal(rgba(tmp_path / "files.png"), rgba(tmp_path / "comfy.png"))
    assert report["variant"] == "qwen-image-2.1" and report["vae"]["name"] == files[2].name
    assert report["text_encoder"]["tokenizer"] == "qwen25_tokenizer/ beside the file"
    loose = comfy_folder(tmp_path / "loose", {".": files})  # a folder of loose files finds the same three
    assert pick(loose, (None,) * 4) == (*(loose / f.name for f in files), None)
    twenty = tmp_path / "20b"  # the 20B model's files: Qwen2.5-VL (as wide as Qwen3-VL here), Wan 2.1's VAE
    twenty.mkdir()
    save_file(folder_tensors(tiny_model_dir / "transformer"), str(twenty / "qwen_image_fp32.safetensors"))
    gguf_text_encoder(tiny_model_dir, twenty / "Qwen2.5-VL-7B-Instruct-F32.gguf")
    wan_vae(tiny_model_dir, twenty / "qwen_image_vae.safetensors")
    comfy_folder(models, {"diffusion_models": [twenty / "qwen_image_fp32.safetensors"],
                          "text_encoders": [twenty / "Qwen2.5-VL-7B-Instruct-F32.gguf"],
                          "vae": [twenty / "qwen_image_vae.safetensors"]})
    code, _, err = cli("generate", "-p", PROMPT, "-m", models, *size, "-o", tmp_path / "x.png", *RUN)
    assert code == 2 and not (tmp_path / "x.png").exists()
    one_line(err, f"{models} has 2 files that fit as the transformer", files[0].name, "qwen_image_fp32.safetensors",
             "choose one with --transformer FILE")
    mine = models / "diffusion_models" / files[0].name
    run(cli, "generate", "-p", PROMPT, "-m", models, "--transformer", mine, *size, "-o", tmp_path / "mixed.png")
    assert np.array_equal(rgba(tmp_path / "files.png"), rgba(tmp_path / "mixed.png"))
    their = models / "diffusion_models" / "qwen_image_fp32.safetensors"
    qwen25 = models / "text_encoders" / "Qwen2.5-VL-7B-Instruct-F32.gguf"
    assert pick(models, (their, None, None, None)) == (their, qwen25, models / "vae" / "qwen_image_vae.safetensors",
                                                       None)
    text_encoder21(qwen21_folders["base"], models / "text_encoders" / "qwen3vl_comfy.safetensors", comfy=True)
    code, _, err = cli("generate", "-p", PROMPT, "-m", models, "--transformer", mine, *size, "-o", tmp_path / "x.png",
                       *RUN)
    assert code == 2 and not (tmp_path / "x.png").exists()
    one_line(err, f"{models} has 2 files that fit as the text encoder", files[1].name, "qwen3vl_comfy.safetensors",
             "choose one with --text-encoder FILE")
    assert pick(models, (their, None, None, None))[1] == qwen25  # the Qwen3-VL files are no candidates
    comfy_vae = load_file(models / "vae" / "qwen_image_vae.safetensors")  # ComfyUI's 2.1 VAE: Wan-style names
    comfy_vae["conv2.weight"] = comfy_vae["conv2.weight"].repeat(1, 4, 1, 1, 1)  # 64 latent channels, as 2.1's
    save_file(comfy_vae, models / "vae" / "qwen_image_2.1_vae_bf16.safetensors")
    (models / "vae" / files[2].name).unlink()
    with pytest.raises(UsageError, match=r"nor holds a Qwen-Image VAE file .*\(skipped: --vae .*qwen_image_2\.1_vae_"
                       r"bf16\.safetensors is in ComfyUI's Wan-style VAE names"):
        pick(models, (mine, models / "text_encoders" / files[1].name, None, None))
