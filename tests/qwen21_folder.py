"""Tiny random Qwen-Image-2.1 folders (the base model and Turbo) in the diffusers layout, and diffusers'
QwenImage21Pipeline assembled on them as the reference.

Every component is built with diffusers' and transformers' own classes (QwenImage21Transformer2DModel,
AutoencoderKLQwenImage21, Qwen3VLForConditionalGeneration) at toy widths and perturbed away from its init, so a
dropped norm, bias or channel shows. The Qwen3-VL text encoder carries a real vision tower (two blocks, both
feeding DeepStack) and the RGBA VAE reads and writes four channels. The tokenizer is a byte-level BPE trained
here on the 2.1 template, so its system message is a handful of whole tokens, and `processor/` holds it with a
Qwen3-VL image processor config (16-pixel patches) and a chat template, written by hand: transformers cannot
save a Qwen3VLProcessor without torchvision (its video processor). Turbo is the same weights with
`sample_sigmas` in model_index.json, as diffusers' modular pipeline tells Turbo apart.

Building both folders takes about a second on the 2-core VM.
"""

import json
import shutil
from pathlib import Path

import torch
from tiny_checkpoint import perturb

from qimg.train.checkpoint import DIFFUSERS_VERSION, special_ids, train_tokenizer

TEXT_HIDDEN = 64  # the text encoder's width = the transformer's context_in_dim
SYSTEM = "Comprehend and analyze the provided prompt."
T2I = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [
    "a red circle on a blue background", "a cat sitting on a wooden table", "make the sky orange",
    "put the cat from picture 2 on the table", "a sign that says hello world", "蓝色背景上的红色圆形",
    "把天空变成橙色", "写着你好世界的牌子", "<image1> <image2> <image3>",
]
# Qwen3-VL's chat template for what the pipeline tokenizes with it (a system message of text parts): enough to
# count the system message's tokens as the reference does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for part in message.content %}{%- if part.type == 'text' %}{{- part.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3-VL's image processor at its real patch, merge and temporal sizes and normalization; the pixel bounds
# small, so a 64-pixel picture stays a few tokens.
MIN_PIXELS, MAX_PIXELS = 32 * 32, 256 * 256
PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessor",
    "merge_size": 2, "patch_size": 16, "temporal_patch_size": 2, "processor_class": "Qwen3VLProcessor",
    "resample": 3, "rescale_factor": 1 / 255, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
    "size": {"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS},
}
SCHEDULER = {  # Qwen-Image's shape of schedule: dynamic shift from the token count, then shift_terminal
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
STRONGER = ("modulation", "txt_in", "attn.to_v", "attn.to_out")  # the transformer weights scaled up
TURBO_SIGMAS = [1.0, 0.9, 0.75, 0.5]  # a Turbo-style grid: its length is the step count
COMPONENTS = {
    "processor": ["transformers", "Qwen3VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
    "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage21"],
}


def build_tokenizer():
    """The template's words whole tokens; the prompts and picture names split into several."""
    return train_tokenizer(PROMPTS, vocab_size=500, templates=(T2I,))


def text_encoder(tokenizer):
    """A two-layer Qwen3-VL (head 16, interleaved mRoPE sections of its rotary half) with a two-block vision
    tower whose both blocks feed DeepStack."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text_ids, ids = special_ids(tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True}, **text_ids)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=TEXT_HIDDEN, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    return Qwen3VLForConditionalGeneration(config)


def build_qwen21_folders(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the base and Turbo folders under `root`: {"base" | "turbo": folder}."""
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel

    root = Path(root)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    encoder = text_encoder(tokenizer)
    transformer = QwenImage21Transformer2DModel(num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                                context_in_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=64)
    for model in (encoder, transformer, vae):
        perturb(model)
    with torch.no_grad():  # at init the prompt moves the tiny image by under a level: make it move by several
        for name, p in transformer.named_parameters():
            if p.ndim == 2 and any(part in name for part in STRONGER):
                p.mul_(4)
    with torch.no_grad():  # latents of a few units, as the real VAE's statistics make them
        vae.register_to_config(latents_mean=torch.randn(64).mul(0.5).tolist(),
                               latents_std=torch.rand(64).add(0.5).tolist())

    base = root / "base"
    encoder.save_pretrained(base / "text_encoder", safe_serialization=True)
    transformer.save_pretrained(base / "transformer", safe_serialization=True)
    vae.save_pretrained(base / "vae", safe_serialization=True)
    tokenizer.save_pretrained(base / "processor")
    (base / "processor" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    (base / "processor" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (base / "scheduler").mkdir()
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION}
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler | SCHEDULER, indent=2) + "\n")

    folders = {"base": base, "turbo": root / "turbo"}
    shutil.copytree(base, folders["turbo"])
    for kind, folder in folders.items():
        index = {"_class_name": "QwenImage21Pipeline", "_diffusers_version": DIFFUSERS_VERSION} | COMPONENTS
        if kind == "turbo":
            index["sample_sigmas"] = TURBO_SIGMAS
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folders


def reference_processor(folder: Path):
    """The Qwen3VLProcessor the pipeline runs: the folder's tokenizer, the PIL image processor, its template."""
    from tiny_edit_checkpoint import allow_missing_video_processor
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLProcessor

    allow_missing_video_processor()
    images = Qwen2VLImageProcessorPil.from_pretrained(folder / "processor")
    return Qwen3VLProcessor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(folder / "processor"),
                            chat_template=(folder / "processor" / "chat_template.jinja").read_text())


def reference_pipeline(folder: Path):
    """The folder's QwenImage21Pipeline in float32, assembled from components (`sample_sigmas` from its
    model_index.json, as from_pretrained would pass it)."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen3VLForConditionalGeneration

    index = json.loads((folder / "model_index.json").read_text())
    pipe = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=AutoencoderKLQwenImage21.from_pretrained(folder / "vae", dtype=torch.float32),
        text_encoder=Qwen3VLForConditionalGeneration.from_pretrained(folder / "text_encoder",
                                                                     dtype=torch.float32).eval(),
        processor=reference_processor(folder),
        transformer=QwenImage21Transformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32),
        sample_sigmas=index.get("sample_sigmas"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

