"""--devices for Qwen-Image-2.1: its transformer's blocks split over two names of the CPU give the one-device
image byte for byte, the prefix cache on (each block's keys and values kept with the block) and off, with
guidance (one cache per branch), from the three split files, and for an edit with a reference picture and a
mask; at the model level the
second stage on the meta device shows that nothing of a stage is left on another device."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qimg.engine.components import Loading
from qimg.engine.qwen21 import Engine21
from qimg.engine.request import Sampling
from qimg.model.rope21 import build_layout
from qimg.model.split import BlockSplit21, place_split
from qimg.model.transformer21 import QwenImage21Transformer, Transformer21Config

pytestmark = pytest.mark.usefixtures("one_thread")
SPLIT = ("--devices", "cpu,cpu")


def transformer_bytes(folder) -> int:
    """The transformer's weights in float32 (the CPU's default dtype), from the folder's headers."""
    from safetensors import safe_open

    total = 0
    for file in (folder / "transformer").glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            total += sum(int(np.prod(f.get_slice(k).get_shape())) * 4 for k in f.keys())
    return total


def rgba(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--no-kv-cache",), ("--cfg", "3", "--negative-prompt", "blurry")])
def test_generate_split_is_byte_identical(cli, qwen21_dir, tmp_path, extra):
    args = ("generate", "-m", qwen21_dir, "-p", "a red circle", "--size", "64x32", "--steps", "3", "--seed", "5",
            "--no-worker", "--no-cache", "--json", *extra)
    code, _, err = cli(*args, "--device", "cpu", "-o", tmp_path / "one.png")
    assert code == 0, err
    code, out, err = cli(*args, *SPLIT, "-o", tmp_path / "two.png")
    assert code == 0, err
    one = rgba(tmp_path / "one.png")
    assert one.std() > 1 and np.array_equal(rgba(tmp_path / "two.png"), one)
    report = json.loads(out.splitlines()[-1])
    assert [d["blocks"] for d in report["placement"]["devices"]] == [[0, 1], [1, 2]]
    held = [d["weight_bytes"] for d in report["placement"]["devices"]]
    assert sum(held) == transformer_bytes(qwen21_dir) and held[0] > held[1]  # the layers around the blocks: first
    assert "qimg: cpu: blocks 0-0 (1)" in err


@pytest.mark.slow
def test_masked_edit_with_a_reference_split_is_byte_identical(qwen21_dir):
    rng = np.random.default_rng(0)
    image, ref = (rng.integers(0, 256, (48, 64, 4), dtype=np.uint8) for _ in range(2))
    mask = np.zeros((48, 64), np.float32)
    mask[8:32, 16:48] = 1
    job = dict(sampling=Sampling("put picture 2 in it", "", 2, 1.0, 3), area=64 * 64)
    one = Engine21(qwen21_dir, "cpu", "float32").edit(image, [ref], mask, **job).image
    loading = Loading(devices=("cpu", "cpu"), split=(1, 1))
    two = Engine21(qwen21_dir, "cpu", "float32", loading=loading).edit(image, [ref], mask, **job).image
    assert np.array_equal(two, one) and not np.array_equal(two[mask > 0], image[mask > 0])
    assert np.array_equal(two[mask == 0], image[mask == 0])


@pytest.mark.slow  # the meta device's kernels import torch's Python decompositions: ~4 s once a process
def test_each_stage_runs_on_its_device_and_keeps_its_cache_there():
    """The second stage on the meta device (shapes only), where an operation mixing in a CPU tensor raises; the
    hidden states' way back cannot be run (nothing copies out of the meta device), so home is the meta device."""
    cfg = Transformer21Config.tiny()
    model = QwenImage21Transformer(cfg).eval()
    place_split(model, [(torch.device("cpu"), 0, 1), (torch.device("meta"), 1, 2)], torch.device("meta"),
                BlockSplit21)
    assert isinstance(model.run_blocks, BlockSplit21)
    slots = torch.tensor([False] * 3 + [True] * 2 + [False])  # text, a 2x4 picture's slots, text
    layout = build_layout(slots, [(2, 4), (2, 2)], cfg.axes_dims_rope, txt_mask=torch.tensor([[1] * 5 + [0]]))
    assert layout.key_valid is not None and len(layout.segments) == 3  # every kind of input exercised
    x, mod = torch.randn(1, layout.length, cfg.dim), torch.randn(1, 2, 4 * cfg.dim)
    with torch.no_grad():
        out, prefix = model.run_blocks(x, mod, layout.prefix, layout, None, True)
        assert out.device.type == "meta" and out.shape == x.shape
        assert [k.device.type for k, _ in prefix] == ["cpu", "meta"]  # each block's keys and values stay with it
        assert [v.shape[1] for _, v in prefix] == [layout.prefix] * 2
        target = x[:, layout.prefix:]
        out, _ = model.run_blocks(target, mod[:, 1:], None, layout, prefix, True)  # read where they are
    assert out.shape == target.shape


@pytest.mark.slow
def test_split_files_split_is_byte_identical(cli, qwen21_folders, tmp_path, monkeypatch):
    """--devices with 2.1's three files (no folder: the plan reads qimg's shipped configs and the files' headers)."""
    import shutil

    from split_layouts21 import TOKENIZER_FILES, files21

    configs = tmp_path / "configs"  # config-only copies, as qimg ships the real ones
    shutil.copytree(qwen21_folders["base"], configs / "qwen-image-2.1",
                    ignore=shutil.ignore_patterns("*.safetensors*", "tokenizer", *TOKENIZER_FILES))
    monkeypatch.setattr("qimg.weights.shipped.CONFIGS", configs)
    transformer, text_encoder, vae = files21(qwen21_folders["base"], tmp_path / "files")
    args = ("generate", "-p", "a red circle", "--transformer", transformer, "--text-encoder", text_encoder, "--vae",
            vae, "--size", "64x32", "--steps", "2", "--seed", "5", "--no-worker", "--no-cache", "--quiet")
    assert cli(*args, "--device", "cpu", "-o", tmp_path / "one.png")[0] == 0
    code, _, err = cli(*args, *SPLIT, "-o", tmp_path / "two.png")
    assert code == 0, err
    assert np.array_equal(rgba(tmp_path / "two.png"), rgba(tmp_path / "one.png"))
