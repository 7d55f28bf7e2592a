"""A tiny random Qwen3-VL text encoder (Qwen-Image-2.1's), built and saved with transformers' own classes:
3 decoder layers of width 64 (head dim 16, interleaved mRoPE sections 2/3/3), a 3-block vision tower of width
32 with 16-pixel patches, an 8x8 learned position table and DeepStack features from blocks 0 and 2. Weights
are drawn large enough that every part (the q/k norms, the position table, each DeepStack feature) moves the
hidden states well past the parity tolerance."""

from pathlib import Path

import torch

IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 200, 201, 202, 203  # token ids in the tiny vocabulary
TEXT = dict(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                             "mrope_interleaved": True})
VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 2])


def tiny_qwen3vl(seed: int = 0):
    """The transformers model, float32, eval mode."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE_PAD,
                           video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1)
        model.model.visual.pos_embed.weight.normal_(0, 1)
    return model


def build_tiny_qwen3vl(folder: Path, seed: int = 0) -> Path:
    """Save the tiny model to folder (a text_encoder/ folder: config.json + model.safetensors); returns it."""
    tiny_qwen3vl(seed).save_pretrained(folder)
    return folder
