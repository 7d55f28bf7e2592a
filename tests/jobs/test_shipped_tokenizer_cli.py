"""`generate` from three split files (a ComfyUI safetensors text encoder with no tokenizer beside it, a
transformer, a Wan VAE) and no model folder takes qimg's shipped Qwen2.5 tokenizer, says so, and gives the bytes
of a folder that holds the same tensors with that tokenizer in its tokenizer/, as does `-m` on the loose files.
The tiny text encoder's embedding is widened to Qwen2.5-VL's 152064 rows, so that every id the real tokenizer
gives has a row."""

import json
import shutil

import numpy as np
import pytest
from helpers import pixels
from safetensors.torch import save_file
from split_layouts import comfy_text_encoder, folder_tensors, wan_vae

from qimg.jobs.metadata import read_params
from qimg.weights.shipped import TOKENIZER

pytestmark = pytest.mark.slow
ROWS = 152064  # Qwen2.5-VL-7B's vocabulary rows
RUN = ["--size", "32x32", "--steps", "2", "--seed", "5", "--device", "cpu", "--no-cache", "--no-worker", "--json"]
SHIPPED = "qimg's Qwen2.5 (shipped)"


@pytest.fixture
def wide_vocabulary(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny folder with a 152064-row embedding and the shipped tokenizer, and its configs as qimg's shipped
    ones (weights.shipped.CONFIGS)."""
    folder = tmp_path / "qwen-image"
    shutil.copytree(tiny_model_dir, folder)
    encoder = folder / "text_encoder"
    state = folder_tensors(encoder)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state:  # the tiny rows repeated: every row differs from zero, as the contents check wants
            state[key] = state[key].repeat(-(-ROWS // state[key].shape[0]), 1)[:ROWS].contiguous()
    for f in encoder.glob("*.safetensors*"):
        f.unlink()
    save_file(state, encoder / "model.safetensors")
    config = json.loads((encoder / "config.json").read_text())
    config["text_config"]["vocab_size"] = ROWS
    (encoder / "config.json").write_text(json.dumps(config))
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(TOKENIZER, folder / "tokenizer")
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs / "qwen-image", ignore=shutil.ignore_patterns("*.safetensors*", "tokenizer"))
    monkeypatch.setattr("qimg.weights.shipped.CONFIGS", configs)
    return folder


def test_generate_from_three_files_takes_the_shipped_tokenizer(cli, wide_vocabulary, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    transformer, vae = files / "qwen_image_fp32.safetensors", files / "qwen_image_vae.safetensors"
    save_file(folder_tensors(wide_vocabulary / "transformer"), transformer)
    text = comfy_text_encoder(wide_vocabulary, files / "qwen_2.5_vl_7b.safetensors")
    wan_vae(wide_vocabulary, vae)
    prompt = ["-p", "a red circle 蓝色背景上的红色圆形"]
    code, _, err = cli("generate", *prompt, "-m", wide_vocabulary, "-o", tmp_path / "folder.png", *RUN)
    assert code == 0, err
    code, out, err = cli("generate", *prompt, "--transformer", transformer, "--text-encoder", text, "--vae", vae,
                         "-o", tmp_path / "files.png", *RUN)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "files.png"))
    assert json.loads(out)["text_encoder"]["tokenizer"] == SHIPPED
    assert read_params(tmp_path / "files.png")["text_encoder"]["tokenizer"] == SHIPPED
    code, _, err = cli("generate", *prompt, "-m", files, "-o", tmp_path / "loose.png", *RUN)  # -m on loose files
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "loose.png"))
    code, out, err = cli("info", text, "--json")
    assert code == 0 and json.loads(out)["tokenizer"] == SHIPPED, err
