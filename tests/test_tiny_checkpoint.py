"""The tiny checkpoint fixture looks like the real Qwen-Image folder and diffusers runs on it."""

import json

import numpy as np
import pytest
import torch
from tiny_checkpoint import build_tiny_checkpoint
from transformers import AutoTokenizer

from qimg.model.text import TEMPLATE as PROMPT_TEMPLATE
from qimg.train.checkpoint import SCHEDULER_CONFIG

ENGLISH = "a red circle on a blue background"
CHINESE = "蓝色背景上的红色圆形"


def files(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_layout(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert {k: v[1] for k, v in index.items() if not k.startswith("_")} == {
        "transformer": "QwenImageTransformer2DModel",
        "vae": "AutoencoderKLQwenImage",
        "text_encoder": "Qwen2_5_VLForConditionalGeneration",
        "tokenizer": "Qwen2Tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }
    names = files(tiny_model_dir)
    weights = {n for n in names if not n.endswith(".json")}
    assert all(n.endswith(".safetensors") for n in weights), weights
    assert {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"} < weights

    index_file = tiny_model_dir / "transformer/diffusion_pytorch_model.safetensors.index.json"
    weight_map = json.loads(index_file.read_text())["weight_map"]
    shards = {n for n in weights if n.startswith("transformer/")}
    assert len(shards) > 1 and {f"transformer/{s}" for s in weight_map.values()} == shards
    assert all("-of-0000" in s for s in shards)

    scheduler = json.loads((tiny_model_dir / "scheduler/scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    a = build_tiny_checkpoint(tmp_path / "a", shard_transformer=False)
    b = build_tiny_checkpoint(tmp_path / "b", seed=1, shard_transformer=False)
    assert "transformer/diffusion_pytorch_model.safetensors" in files(a)
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (a / name).read_bytes() == (tiny_model_dir / name).read_bytes()
        assert (a / name).read_bytes() != (b / name).read_bytes()


@pytest.mark.parity
def test_template_prefix_is_exactly_the_dropped_34_tokens(tiny_model_dir, reference_pipeline):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    assert type(tok).__name__ == type(reference_pipeline.tokenizer).__name__ == "Qwen2Tokenizer"
    assert reference_pipeline.prompt_template_encode == PROMPT_TEMPLATE
    prefix, suffix = PROMPT_TEMPLATE.split("{}")
    assert len(tok(prefix).input_ids) == reference_pipeline.prompt_template_encode_start_idx == 34
    assert len(tok(suffix).input_ids) == 5  # <|im_end|> \n <|im_start|> assistant \n
    assert tok.decode(tok(CHINESE).input_ids) == CHINESE


@pytest.mark.parity
def test_encode_prompt_keeps_prompt_and_suffix(reference_pipeline):
    tok = reference_pipeline.tokenizer
    suffix = len(tok(PROMPT_TEMPLATE.split("{}")[1]).input_ids)
    lengths = [len(tok(p).input_ids) + suffix for p in (ENGLISH, CHINESE)]
    with torch.no_grad():
        embeds, mask = reference_pipeline.encode_prompt([ENGLISH, CHINESE])
    assert embeds.shape == (2, max(lengths), 64)
    assert mask.sum(1).tolist() == lengths
    assert torch.isfinite(embeds).all()


@pytest.mark.parity
@pytest.mark.parametrize(
    "prompt, height, width", [(ENGLISH, 64, 64), (CHINESE, 48, 80)], ids=["english-64x64", "chinese-48x80"]
)
def test_pipeline_generates(reference_pipeline, prompt, height, width):
    image = reference_pipeline(
        prompt, height=height, width=width, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (width, height)
    assert np.asarray(image).std() > 0
