"""--devices: the transformer's blocks split over devices in one process give the single-device result byte for
byte (two names of the CPU, as a machine without GPUs can test): generate with a LoRA on packed fp8 layers,
previews and the caches, inpaint with the attention mask (pixels outside the mask the input's), an Edit-2511
edit with a reference picture; the plan printed and in --json; the refusals."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import lightning_lora, lora_layers, one_line, pixels
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from qimg.engine import components
from qimg.engine.components import Loading
from qimg.engine.engine import Engine
from qimg.engine.request import Sampling
from qimg.model.split import BlockSplit

pytestmark = pytest.mark.usefixtures("one_thread")
SPLIT = ("--devices", "cpu,cpu")


def run(cli, *args):
    code, out, err = cli(*args, "--no-worker", "--json")
    assert code == 0, err
    return out, err


@pytest.mark.slow
def test_generate_split_is_byte_identical_with_a_lora_on_packed_layers_previews_and_caches(tiny_model_dir, tmp_path,
                                                                                          cli):
    lora = tmp_path / "lightning.safetensors"
    save_file(lightning_lora(lora_layers(tiny_model_dir), std=0.05), lora)
    args = ("generate", "-m", tiny_model_dir, "-p", "a red circle", "--size", "64x48", "--steps", 3, "--seed", 5,
            "--lora", lora, "--quantize", "fp8", "--no-dequantize", "--preview-every", 1)
    run(cli, *args, "-o", tmp_path / "one.png", "--preview", tmp_path / "one-preview.png")
    out, err = run(cli, *args, *SPLIT, "-o", tmp_path / "two.png", "--preview", tmp_path / "two-preview.png")
    one = pixels(tmp_path / "one.png")
    assert one.std() > 1 and np.array_equal(pixels(tmp_path / "two.png"), one)
    assert np.array_equal(pixels(tmp_path / "two-preview.png"), pixels(tmp_path / "one-preview.png"))
    report = json.loads(out)
    assert report["prompt_cache"] == "hit"  # the first run's embedding, on the split engine
    assert [d["blocks"] for d in report["placement"]["devices"]] == [[0, 1], [1, 2]]
    assert report["placement"]["text_encoder"] == {"device": "cpu", "released": False}
    assert "qimg: cpu: blocks 0-0 (1)" in err and "qimg: text encoder: cpu (stays loaded); VAE: cpu" in err


@pytest.mark.slow
def test_inpaint_split_is_byte_identical_and_keeps_the_pixels_outside_the_mask(tiny_model_dir):
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.float32)
    mask[8:24, 16:40] = 1
    job = dict(sampling=Sampling("a red circle", " ", steps=2, cfg=4.0, seed=3), attn_mask=True)
    one = Engine(tiny_model_dir, "cpu", "float32").inpaint(image, mask, **job).image
    engine = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(devices=("cpu", "cpu"), split=(1, 1)))
    two = engine.inpaint(image, mask, **job).image
    assert np.array_equal(two, one) and not np.array_equal(two[mask > 0], image[mask > 0])
    assert np.array_equal(two[mask == 0], image[mask == 0])
    split = engine.transformer.run_blocks
    assert isinstance(split, BlockSplit) and [(a, b) for _, a, b in split.stages] == [(0, 1), (1, 2)]


@pytest.mark.slow
def test_a_text_encoder_the_plan_releases_encodes_first_and_model_offload_reloads_the_split(tiny_model_dir):
    job = dict(sampling=Sampling("a red circle", " ", steps=2, cfg=4.0, seed=3), width=64, height=48)
    one = Engine(tiny_model_dir, "cpu", "float32").generate(**job).image
    engine = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(devices=("cpu", "cpu")))
    engine.placement = replace(engine.placement, text_released=True)  # as when it does not fit beside the blocks
    assert np.array_equal(engine.generate(**job).image, one)
    assert engine._text is None and engine._transformer is not None
    engine = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(offload="model", devices=("cpu", "cpu")))
    for _ in range(2):  # the transformer freed after each run, split again when it reloads
        assert np.array_equal(engine.generate(**job).image, one) and engine._transformer is None


@pytest.mark.slow
def test_a_released_text_encoder_never_loads_beside_the_blocks_for_a_later_prompt(tiny_model_dir, monkeypatch):
    # --prompts' next entry, an Edit folder's next image, --no-cache: each prompt that misses the cache reloads
    # the text encoder; where the plan releases it, the transformer's blocks must be off the devices by then
    engine = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(devices=("cpu", "cpu")))
    engine.placement = replace(engine.placement, text_released=True)
    resident = []
    load = components.load_text_encoder
    monkeypatch.setattr(components, "load_text_encoder",
                        lambda *a, **k: resident.append(engine._transformer is not None) or load(*a, **k))
    jobs = [dict(sampling=Sampling(p, " ", steps=2, cfg=4.0, seed=3), width=64, height=48) for p in ("a", "b")]
    images = [engine.generate(**job).image for job in jobs]
    assert resident == [False, False]
    one = Engine(tiny_model_dir, "cpu", "float32")
    assert all(np.array_equal(image, one.generate(**job).image) for image, job in zip(images, jobs))


@pytest.mark.slow
def test_edit_2511_with_a_reference_picture_split_is_byte_identical(tiny_2511_dir, tmp_path, cli):
    photo, ref = tmp_path / "photo.png", tmp_path / "ref.png"
    Image.fromarray(data.astronaut()).crop((0, 0, 400, 240)).resize((96, 64)).save(photo)
    Image.fromarray(data.astronaut()).crop((200, 100, 400, 400)).resize((64, 96)).save(ref)
    args = ("edit", photo, "--ref", ref, "-m", tiny_2511_dir, "-p", "put the lamp from picture 2 on the table",
            "--edit-area", 96 * 64, "--vision-area", 64 * 64, "--steps", 2, "--seed", 11, "--no-cache")
    run(cli, *args, "-o", tmp_path / "one.png")
    run(cli, *args, *SPLIT, "--split", "1,1", "-o", tmp_path / "two.png")
    one = pixels(tmp_path / "one.png")
    assert one.std() > 1 and np.array_equal(pixels(tmp_path / "two.png"), one)


@pytest.mark.slow
def test_a_preset_gives_the_devices_and_the_split(tiny_model_dir, tmp_path, cli):
    preset = tmp_path / "two.yaml"
    preset.write_text("devices: cpu,cpu\nsplit: 2,0\n")
    code, _, err = cli("generate", "-m", tiny_model_dir, "-p", "x", "--preset", preset, "--no-worker")
    assert code == 2
    one_line(err, "--split 2,0: every device takes at least one block")
    preset.write_text("devices: cpu,cpu\nsplit: 1,1\nsteps: 1\nsize: 32x32\n")
    out, _ = run(cli, "generate", "-m", tiny_model_dir, "-p", "x", "--preset", preset, "-o", tmp_path / "o.png")
    assert [d["blocks"] for d in json.loads(out)["placement"]["devices"]] == [[0, 1], [1, 2]]


@pytest.mark.parametrize("args, fragments", [
    (("--devices", "cpu,tpu"), ("--devices", "'tpu' is not a device")),
    (("--split", "1,1"), ("--split 1,1 goes with --devices",)),
    (("--devices", "cpu,cpu", "--device", "cpu"), ("give --device cpu or --devices cpu,cpu, not both",)),
    (("--devices", "cpu,cpu", "--split", "2,1"), ("--split 2,1 adds up to 3, and the model has 2",)),
    (("--devices", "cpu,cpu", "--split", "2"), ("gives 1 block counts for 2 --devices",)),
    (("--devices", "cpu,cpu", "--split", "1,x"), ("--split", "not block counts")),
    (("--devices", "cpu,cpu,cpu"), ("3 devices for 2 transformer blocks",)),
    (("--devices", "cpu,cpu", "--offload", "blocks"), ("--devices does not combine with --offload blocks",)),
])
def test_refusals_are_one_usage_line(tiny_model_dir, tmp_path, cli, args, fragments):
    code, out, err = cli("generate", "-m", tiny_model_dir, "-p", "x", "--size", "32x32", "--steps", 1,
                         "-o", tmp_path / "o.png", "--no-worker", *args)
    assert code == 2 and out == ""
    one_line(err, *fragments)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("gpus", [0, 2])
def test_a_cuda_device_the_machine_lacks_is_refused_with_or_without_gpus(tiny_model_dir, tmp_path, cli, monkeypatch,
                                                                        gpus):
    # the machine's GPUs faked, so the refusal is checked as a machine without GPUs and one with two would see it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    code, out, err = cli("generate", "-m", tiny_model_dir, "-p", "x", "--size", "32x32", "--steps", 1,
                         "-o", tmp_path / "o.png", "--no-worker", "--devices", f"cpu,cuda:{gpus}")
    assert code == 2 and out == ""
    one_line(err, f"--devices cuda:{gpus}", "only 2 CUDA device(s) present" if gpus else "CUDA is not available here")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("args, env, fragment", [
    (("--ray", "local"), {}, "--devices does not combine with --ray"),
    (("--shard", "auto"), {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
     "--devices does not combine with --shard auto under torchrun (every rank would split over cpu,cpu)"),
])
def test_devices_are_refused_where_every_process_would_split_over_the_same_ones(tiny_model_dir, tmp_path, cli,
                                                                               monkeypatch, args, env, fragment):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    code, out, err = cli("generate", "-m", tiny_model_dir, "--prompts", prompts, "--size", "32x32", "--steps", 1,
                         "--out-dir", tmp_path / "out", "--no-worker", *SPLIT, *args)
    assert code == 2 and out == ""
    one_line(err, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_shard_the_user_starts_names_its_own_devices(tiny_model_dir, tmp_path, cli):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    code, _, err = cli("generate", "-m", tiny_model_dir, "--prompts", prompts, "--size", "32x32", "--steps", 1,
                       "--out-dir", tmp_path / "out", "--no-worker", *SPLIT, "--shard", "1/2")
    assert code == 0, err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
