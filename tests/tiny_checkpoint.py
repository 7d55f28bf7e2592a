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

import json
import re
import shutil
from pathlib import Path

import torch

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
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
# In Qwen's order; the text encoder config points its vision token ids at the last four.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
TEXT_HIDDEN = 64  # text encoder width = transformer joint_attention_dim
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def build_tokenizer():
    """Qwen2Tokenizer over a byte-level BPE trained on the template (x100, so every template word
    merges to one token) and a few English/Chinese prompts (which stay split into several)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # Special tokens are cut out of the training text: they are whole tokens, never merged.
    template = re.split(r"<\|im_(?:start|end)\|>", PROMPT_TEMPLATE.format(""))
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(template * 100 + PROMPTS, trainer)

    vocab = bpe.get_vocab()
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)})  # after BPE ids, as Qwen
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(  # special tokens and max length as in Qwen-Image's tokenizer_config.json
        vocab=vocab, merges=merges, eos_token="<|im_end|>", extra_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=131072,
    )


def build_text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
        # mrope_section sums to head_dim / 2 = 8 (the real one is [16, 24, 24] for 128)
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


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
    text_encoder = build_text_encoder(tokenizer)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6),  # sums to head dim
    )
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16)
    for model in (text_encoder, transformer, vae):
        perturb(model)

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    if shard_transformer:  # ~370 KB of weights -> 4 shards plus the index
        shutil.rmtree(path / "transformer")
        transformer.save_pretrained(path / "transformer", safe_serialization=True, max_shard_size="100KB")
    return path
