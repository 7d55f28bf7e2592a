"""Building blocks of a Qwen-Image checkpoint folder in the diffusers layout, written without diffusers.

Used to export the built-in model and, by the tests, to build tiny random checkpoints: the same
tokenizer recipe, the same Qwen2.5-VL text encoder class, the same file layout as the real model.
"""

import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from qimg.model.text import TEMPLATE

# In Qwen's order; the text encoder config points its vision token ids at the last four.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
SCHEDULER_CONFIG = {  # Qwen-Image's scheduler/scheduler_config.json
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
DIFFUSERS_VERSION = "0.42.1"  # the layout written here is the one this diffusers version reads
COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def train_tokenizer(texts: list[str], vocab_size: int, templates: tuple[str, ...] = (TEMPLATE,)):
    """A Qwen2Tokenizer over a byte-level BPE trained on the prompt templates (x100, so every template
    word merges to one token and each system prefix is exactly the tokens the reference drops: 34 for
    the base template) and `texts`."""
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
    specials = "|".join(re.escape(t) for t in SPECIAL_TOKENS)
    template = [piece for t in templates for piece in re.split(specials, t.format(""))]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(template * 100 + list(texts), trainer)

    vocab = bpe.get_vocab()
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)})  # after BPE ids, as Qwen
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(  # special tokens and max length as in Qwen-Image's tokenizer_config.json
        vocab=vocab, merges=merges, eos_token="<|im_end|>", extra_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=131072,
    )


def special_ids(tokenizer) -> tuple[dict, dict]:
    """The special token ids a Qwen2_5_VLConfig names: those of its text config, and its own."""
    ids = tokenizer.convert_tokens_to_ids
    return (dict(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>")),
            dict(vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                 image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>")))


def text_encoder(tokenizer, hidden: int, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 vision: dict | None = None):
    """A small Qwen2_5_VLForConditionalGeneration whose hidden size is the transformer's text width. Its
    vision tower is minimal unless `vision` (a vision_config) is given: the reference class requires one,
    text-to-image never runs it; the edit models do."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_ids, ids = special_ids(tokenizer)
    half = hidden // heads // 2  # mrope sections split the rotary half of a head: real [16, 24, 24] of 64
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": sections},
        **text_ids,
    )
    vision = vision or dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1, out_hidden_size=hidden,
                            fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))


def _config_json(class_name: str, config) -> str:
    d = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}
    d.update({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()})
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def write_folder(path: Path, transformer, vae, encoder, tokenizer, dtype: torch.dtype = torch.float16,
                 defaults: dict | None = None) -> Path:
    """Save native transformer/VAE modules, a transformers text encoder and tokenizer as a diffusers
    pipeline folder (weights stored in `dtype`); `defaults` becomes qimg.json."""
    path = Path(path)
    for name in COMPONENTS:
        (path / name).mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "QwenImagePipeline", "_diffusers_version": DIFFUSERS_VERSION} | COMPONENTS
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION}
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler | SCHEDULER_CONFIG, indent=2) + "\n")
    for name, module, cls in (("transformer", transformer, "QwenImageTransformer2DModel"),
                              ("vae", vae, "AutoencoderKLQwenImage")):
        (path / name / "config.json").write_text(_config_json(cls, module.cfg))
        state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
        save_file(state, path / name / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    encoder.to(dtype).save_pretrained(path / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(path / "tokenizer")
    if defaults:
        (path / "qimg.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return path
