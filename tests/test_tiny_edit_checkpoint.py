"""The tiny Qwen-Image-Edit folders look like the real ones (Edit, 2509, 2511) and diffusers runs on them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_edit_checkpoint import KINDS, reference_edit_pipeline, small_areas
from transformers import AutoTokenizer

from qimg.model.instruct_text import DROP, EDIT_TEMPLATE, SYSTEM
from qimg.model.text import DROP as BASE_DROP
from qimg.model.text import TEMPLATE


def test_layout(tiny_edit_checkpoints):
    assert set(tiny_edit_checkpoints) == set(KINDS)
    for kind, folder in tiny_edit_checkpoints.items():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == KINDS[kind]
        assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
        assert all((folder / name).is_dir() for name in index if not name.startswith("_"))
        preprocessor = json.loads((folder / "processor" / "preprocessor_config.json").read_text())
        assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == (3136, 12845056)
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        assert transformer.get("zero_cond_t", False) == (kind == "2511")
        encoder = json.loads((folder / "text_encoder" / "config.json").read_text())
        assert encoder["vision_config"]["depth"] == 2 and encoder["vision_config"]["fullatt_block_indexes"] == [1]


@pytest.mark.parity
def test_template_prefixes_are_the_dropped_tokens(tiny_edit_dir):
    for part in ("tokenizer", "processor"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_edit_dir / part)
        assert len(tokenizer(SYSTEM).input_ids) == DROP == 64
        assert len(tokenizer(TEMPLATE.split("{}")[0]).input_ids) == BASE_DROP == 34
        ids = tokenizer(EDIT_TEMPLATE.format("x")).input_ids
        assert ids[DROP] == tokenizer.convert_tokens_to_ids("<|vision_start|>")


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["edit", "2511"])
def test_reference_pipeline_runs_with_small_areas(tiny_edit_checkpoints, kind, monkeypatch, one_thread):
    small_areas(monkeypatch, 96 * 64, 56 * 56)
    pipe = reference_edit_pipeline(tiny_edit_checkpoints[kind])
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (60, 90, 3), dtype=np.uint8))
    out = pipe(image=image, prompt="make it red", negative_prompt=" ", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 96, 3) and np.isfinite(out.images).all()  # calculate_dimensions(96*64, 1.5)
