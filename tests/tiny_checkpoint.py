"""A tiny random Qwen-Image checkpoint in the exact diffusers folder layout, built offline.

Parity tests load the same folder into qimg and into `diffusers.QwenImagePipeline` and compare
the numbers, so the folder must look like the real one (model_index.json, sharded safetensors
transformer with its index, Qwen2.5-VL text encoder, Qwen2 BPE tokenizer, real scheduler config)
while being small enough to build and run on CPU in seconds. Every parameter is perturbed away
from its init (norm weights != 1, biases != 0) so a dropped or misplaced norm/bias shows up.

The tokenizer is a byte-level BPE trained here on the prompt template, so the template's system
prefix tokenizes to exactly 34 tokens, as with the real tokenizer: the reference's fixed drop of
34 positions then removes exactly the prefix.
"""

import shutil
from pathlib import Path

import torch

from qimg.train.checkpoint import SCHEDULER_CONFIG, text_encoder, train_tokenizer

PROMPTS = [
    "a red circle on a blue background",
    "a cat sitting on a wooden table",
    "a photo of a mountain lake at sunset",
    "a sign that says hello world",
    "蓝色背景上的红色圆形",
    "一只猫坐在木桌上",
    "日落时分的山间湖泊",
    "写着你好世界的牌子",
]
TEXT_HIDDEN = 64  # text encoder width = transformer joint_attention_dim


def build_tokenizer():
    """Every template word one token; the test prompts stay split into several."""
    return train_tokenizer(PROMPTS, vocab_size=400)


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Add noise to every parameter: 10% of its spread, or std `scale` where it is constant
    (norm weights at 1, biases at 0), so parity tests catch a dropped or misplaced norm or bias."""
    with torch.no_grad():
        for p in model.parameters():
            std = p.std().item() if p.numel() > 1 else 0.0
            p.add_(torch.randn_like(p) * scale * (std or 1.0))


def build_tiny_checkpoint(path: Path, seed: int = 0, shard_transformer: bool = True) -> Path:
    """Write a tiny random Qwen-Image pipeline folder at `path`; deterministic for a given seed."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    encoder = text_encoder(tokenizer, TEXT_HIDDEN)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6),  # sums to head dim
    )
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16)
    for model in (encoder, transformer, vae):
        perturb(model)

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    if shard_transformer:  # ~370 KB of weights -> 4 shards plus the index
        shutil.rmtree(path / "transformer")
        transformer.save_pretrained(path / "transformer", safe_serialization=True, max_shard_size="100KB")
    return path


def as_2512(folder: Path, path: Path) -> Path:
    """The tiny Qwen-Image folder as Qwen-Image-2512 ships it: the same architecture and files, its configs saved
    by a later diffusers (0.36), so the transformer's config spells out every flag of the class (off) and drops
    Qwen-Image's unused `pooled_projection_dim`."""
    import json

    path = Path(shutil.copytree(folder, path))
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "_diffusers_version": "0.36.0.dev0"}, indent=2))
    config = json.loads((path / "transformer" / "config.json").read_text())
    config.pop("pooled_projection_dim", None)
    config.update(_diffusers_version="0.36.0.dev0", guidance_embeds=False, zero_cond_t=False,
                  use_additional_t_cond=False, use_layer3d_rope=False)
    (path / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    return path
