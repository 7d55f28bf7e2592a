"""The rest of the family beside Qwen-Image-2.1 (issue 26, item 8): a Qwen-Image-2512 folder (Qwen-Image's
architecture, its configs saved by a later diffusers) and an Edit-2511 folder load and run as before, and
Qwen-Image-Layered and Qwen-Image-2.0 folders are refused by name in one line before anything loads."""

import json

import numpy as np
import pytest
from helpers import one_line, pixels
from PIL import Image
from tiny_checkpoint import as_2512

from qimg.weights.folders import EDIT_2511, QWEN_IMAGE, model_kind

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ("--steps", "2", "--seed", "3", "--device", "cpu", "--no-worker", "--json", "--no-cache")


@pytest.fixture(scope="module")
def tiny_2512_dir(tiny_model_dir, tmp_path_factory):
    return as_2512(tiny_model_dir, tmp_path_factory.mktemp("tiny-2512") / "Qwen-Image-2512")


@pytest.mark.slow
def test_a_2512_folder_runs_as_qwen_image(cli, tiny_model_dir, tiny_2512_dir, tmp_path):
    assert model_kind(tiny_2512_dir) == QWEN_IMAGE
    reports = {}
    for name, folder in (("base", tiny_model_dir), ("2512", tiny_2512_dir)):
        code, out, err = cli("generate", "-m", folder, "-p", "a red circle", "--size", "48x32",
                             "-o", tmp_path / f"{name}.png", *FAST)
        assert code == 0, err
        reports[name] = json.loads(out)
        code, out, err = cli("inpaint", tmp_path / f"{name}.png", "-m", folder, "-p", "a cat", "--rect", "8,8,16,16",
                             "-o", tmp_path / f"{name}-inpaint.png", *FAST)
        assert code == 0, err
    for suffix in ("", "-inpaint"):  # the same weights: the same pixels (the metadata names the folder)
        assert np.array_equal(pixels(tmp_path / f"base{suffix}.png"), pixels(tmp_path / f"2512{suffix}.png"))
    assert reports["2512"]["seed"] == reports["base"]["seed"] and pixels(tmp_path / "2512.png").std() > 1


@pytest.mark.slow
def test_an_edit_2511_folder_edits_as_before(cli, tiny_2511_dir, tmp_path):
    assert model_kind(tiny_2511_dir) == EDIT_2511
    rng = np.random.default_rng(0)
    for name in ("photo", "ref"):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), np.uint8)).save(tmp_path / f"{name}.png")
    code, out, err = cli("edit", tmp_path / "photo.png", "--ref", tmp_path / "ref.png", "-m", tiny_2511_dir,
                         "-p", "the cat from picture 2", "--edit-area", str(48 * 32), "-o", tmp_path / "o.png", *FAST)
    assert code == 0, err
    report = json.loads(out)
    assert report["model_kind"] == "edit-2511" and Image.open(tmp_path / "o.png").size == (48, 32)
    assert "licence" not in report or report["licence"] == "Apache-2.0"


@pytest.mark.parametrize("class_name, family", [
    ("QwenImageLayeredPipeline", "Qwen-Image-Layered"), ("QwenImageLayeredModularPipeline", "Qwen-Image-Layered"),
    ("QwenImage2Pipeline", "Qwen-Image-2.0"), ("QwenImage20Pipeline", "Qwen-Image-2.0")])
@pytest.mark.parametrize("command", ["generate", "edit", "inpaint"])
def test_layered_and_2_0_folders_are_refused_by_name(cli, tmp_path, class_name, family, command):
    folder = tmp_path / family
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    args = {"generate": ["generate", "-p", "x", "-m", folder, "-o", tmp_path / "o.png"],
            "edit": ["edit", tmp_path / "in.png", "-p", "x", "-m", folder, "-o", tmp_path / "o.png"],
            "inpaint": ["inpaint", tmp_path / "in.png", "--rect", "0,0,8,8", "-p", "x", "-m", folder,
                        "-o", tmp_path / "o.png"]}[command]
    code, _, err = cli(*args, "--no-worker")
    assert code == 2 and not (tmp_path / "o.png").exists()
    one_line(err, str(folder), f"is {family} ({class_name}), which qimg does not run")
