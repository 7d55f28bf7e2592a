"""Qwen-Image-2.1's prompt encoder from a model folder: the tokenizer and the image processor's settings from
`processor/`, the Qwen3-VL text encoder from `text_encoder/` (weights/qwen3vl.py), put together as
model/qwen21_prompt.py's PromptEncoder21. The transformer and the VAE load through weights/qwen21.py."""

from pathlib import Path

import torch

from qimg.errors import QimgError
from qimg.model.qwen21_prompt import PromptEncoder21
from qimg.weights.qwen3vl import configs, load_image_config, load_qwen3vl
from qimg.weights.tokenizer import read_tokenizer


def load_prompt_encoder(folder: Path, dtype: torch.dtype, device: torch.device) -> PromptEncoder21:
    processor = folder / "processor"
    if not processor.is_dir():
        raise QimgError(f"{processor} is missing: the model folder is incomplete (Qwen-Image-2.1 keeps its "
                        "tokenizer and image settings there)")
    encoder = load_qwen3vl(folder / "text_encoder", dtype, device)
    image_cfg = load_image_config(processor, configs(folder / "text_encoder")[1])
    return PromptEncoder21(read_tokenizer(processor), encoder, image_cfg, dtype, device)
