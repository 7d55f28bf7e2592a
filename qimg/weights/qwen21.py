"""Qwen-Image-2.1's transformer and RGBA VAE from a diffusers model folder, or the transformer from one file.

The same strictness as the 20B models': a config key the model cannot honour, a missing, unexpected or
misshapen weight, or a damaged tensor is one line naming the file and key. The transformer loads through
transformer.load_transformer (a folder's sharded safetensors, `--transformer` single files and GGUF with
ComfyUI's names, `--quantize fp8`); the VAE through folders.load_module.
"""

from pathlib import Path

import torch

from qimg.errors import QimgError
from qimg.model.transformer21 import QwenImage21Transformer, Transformer21Config
from qimg.model.vae21 import QwenImage21VAE, VAE21Config
from qimg.weights.folders import load_module, read_config
from qimg.weights.transformer import Source, load_transformer


def _config(cls, component: Path):
    try:
        return cls.from_dict(read_config(component))
    except (ValueError, TypeError) as e:
        raise QimgError(f"{component / 'config.json'}: {e}") from None


def transformer21_config(model: Path) -> Transformer21Config:
    """The model folder's transformer/config.json."""
    return _config(Transformer21Config, model / "transformer")


def vae21_config(model: Path) -> VAE21Config:
    """The model folder's vae/config.json."""
    return _config(VAE21Config, model / "vae")


def load_transformer21(model: Path, source: Source, dtype: torch.dtype,
                       device: torch.device) -> QwenImage21Transformer:
    """The transformer of the model folder, its weights from `source` (Source() for the folder's own)."""
    return load_transformer(transformer21_config(model), model / "transformer", source, dtype, device)


def load_vae21(model: Path, dtype: torch.dtype, device: torch.device, only: tuple[str, ...] = ()) -> QwenImage21VAE:
    """The model folder's VAE. only: key prefixes to read, e.g. ("decoder.", "post_quant_conv.") for a run that
    only decodes (the rest stays on the meta device; every key is still checked)."""
    cfg = vae21_config(model)
    return load_module(lambda: QwenImage21VAE(cfg), model / "vae", dtype, device, only=only)
