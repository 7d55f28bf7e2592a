"""Qwen-Image-2.1's pure pieces against its reference pipeline, one at a time: the model kind from
model_index.json (Turbo by its sampling grid), the schedule (the grid or linspace, the dynamic shift from the
token count, shift_terminal, diffusers' scheduler defaults for missing keys), the prompt text the processor
gets and the drop count, and the one resize of every picture (RGBA, LANCZOS, multiples of 32)."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions, calculate_shift
from helpers import one_line
from PIL import Image
from qwen21_folder import SCHEDULER, reference_pipeline

from qimg.engine.canvas import resample
from qimg.engine.qwen21_inputs import rgba, working_size
from qimg.model.qwen21_prompt import SYSTEM_MESSAGE, drop_count, prompt_text
from qimg.sampling import ScheduleConfig, flow_sigmas
from qimg.weights.folders import QWEN_IMAGE_21, QWEN_IMAGE_21_TURBO, model_kind, named_kind, sample_sigmas
from qimg.weights.tokenizer import read_tokenizer


@pytest.fixture(scope="module")
def pipe(qwen21_dir):
    return reference_pipeline(qwen21_dir)


def test_model_kinds(qwen21_folders):
    assert model_kind(qwen21_folders["base"]) == QWEN_IMAGE_21 and sample_sigmas(qwen21_folders["base"]) is None
    assert model_kind(qwen21_folders["turbo"]) == QWEN_IMAGE_21_TURBO
    assert QWEN_IMAGE_21.generates and QWEN_IMAGE_21.edits and QWEN_IMAGE_21.rgba
    assert QWEN_IMAGE_21.licence == "Qwen Research License"
    for name, kind in (("qwen_image_2.1_bf16.safetensors", QWEN_IMAGE_21),
                       ("Qwen-Image-2.1-Turbo-Q8_0.gguf", QWEN_IMAGE_21_TURBO)):
        assert named_kind(type("P", (), {"name": name})()) == kind


@pytest.mark.parametrize("grid", [[1.2, 0.5], [0.5, 0.9], "fast"])
def test_a_bad_sampling_grid_is_one_line(qwen21_dir, tmp_path, grid, cli):
    folder = tmp_path / "bad"
    shutil.copytree(qwen21_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((folder / "model_index.json").read_text()) | {"sample_sigmas": grid}
    (folder / "model_index.json").write_text(json.dumps(index))
    code, _, err = cli("generate", "-m", folder, "-p", "x", "--no-worker")
    assert code == 2
    one_line(err, "sample_sigmas must be a list of decreasing numbers")


@pytest.mark.parametrize("grid", [None, (1.0, 0.9, 0.75, 0.5)])
@pytest.mark.parametrize("tokens", [16, 1024, 16384])
@pytest.mark.parametrize("missing", [(), ("max_shift", "max_image_seq_len", "shift_terminal")])
def test_schedule_matches_the_reference_scheduler(grid, tokens, missing):
    config = {k: v for k, v in SCHEDULER.items() if k not in missing}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(tokens, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                         scheduler.config.get("max_shift", 1.15))
    steps = 40
    scheduler.set_timesteps(sigmas=list(grid) if grid else np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_sigmas(steps, tokens, ScheduleConfig.from_scheduler(config), grid)
    assert torch.equal(ours, scheduler.sigmas)


@pytest.mark.parametrize("prompt, pictures", [("a cat", 0), ("", 0), ("把天空变成橙色", 1), ("put it there", 3)])
def test_prompt_text_is_what_the_processor_gets(pipe, monkeypatch, prompt, pictures):
    seen = []
    call = type(pipe.processor).__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["text"])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe.processor), "__call__", spy)
    images = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(pictures)] or None
    pipe.encode_prompt(prompt, image=images)
    assert seen == [[prompt_text(prompt, pictures)]]


def test_drop_count_is_the_system_messages_tokens(pipe, qwen21_dir):
    tokenizer = read_tokenizer(qwen21_dir / "processor")
    assert drop_count(lambda text: tokenizer.ids([text])[0]) == pipe._drop_idx == 12
    assert SYSTEM_MESSAGE.startswith("<|im_start|>system\n")


@pytest.mark.parametrize("size", [(75, 53), (64, 64), (300, 37)])
@pytest.mark.parametrize("mode", ["RGBA", "RGB", "P"])
def test_one_resize_feeds_the_vision_tower_and_the_vae(pipe, size, mode):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode) if mode != "P" else \
        Image.fromarray(pixels[..., :3]).convert("P")
    area = 64 * 64
    width, height, _ = calculate_dimensions(area, size[0] / size[1])
    assert working_size(size, area) == (width, height)
    ours = resample(rgba(np.asarray(image.convert("RGBA"))), (width, height))
    reference = pipe.image_processor.resize(image.convert("RGBA"), width=width, height=height)
    assert np.array_equal(ours, np.asarray(reference))
    vae_input = pipe.image_processor.preprocess(image.convert("RGBA"), width=width, height=height)
    assert vae_input.shape[1] == 4
    ours_input = torch.from_numpy(np.array(ours)).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    torch.testing.assert_close(ours_input, vae_input, rtol=0, atol=1e-6)
