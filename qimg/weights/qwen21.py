"""Qwen-Image-2.1's transformer and RGBA VAE from a diffusers model folder, or the transformer from one file.

The same strictness as the 20B models': a config key the model cannot honour, a missing, unexpected or
misshapen weight, or a damaged tensor is one line naming the file and key. The transformer loads through
transformer.load_transformer (a folder's sharded safetensors, `--transformer` single files and GGUF with
ComfyUI's names, `--quantize fp8`); the VAE through folders.load_module. LoRA files written for ComfyUI's fused
`img_mlp.gate_up` are split here for lora.map_keys.
"""

from pathlib import Path

import torch

from qimg.errors import QimgError, UsageError
from qimg.model.transformer21 import QwenImage21Transformer, Transformer21Config
from qimg.model.vae21 import QwenImage21VAE, VAE21Config
from qimg.weights.folders import load_module, read_config
from qimg.weights.lora_keys import PARTS, split_key
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


def unfused_lora(tensors: dict, what: str) -> dict:
    """A LoRA file's updates of a fused `img_mlp.gate_up` (ComfyUI's Qwen-Image-2.1 naming: SwiGLU gate and up in
    one layer, gate rows first) as updates of the model's `gate_layer` and `proj`: the down factor and alpha shared,
    the up factor's rows halved. Exact: the fused W[:h] += up[:h] @ down is gate_layer's update."""
    out = {}
    for key, t in tensors.items():
        layer, suffix = split_key(key)
        if suffix is None or not layer.endswith(("img_mlp.gate_up", "img_mlp_gate_up")):
            out[key] = t
            continue
        kind, part = PARTS[suffix]
        if kind not in (None, "lora"):
            raise UsageError(f"{what}: {key} is a {kind} update of the fused gate_up layer; qimg splits only plain "
                             "LoRAs on it")
        if part == "up" and (t.ndim != 2 or t.shape[0] % 2):
            raise UsageError(f"{what}: {key} has shape {list(t.shape)}, not the gate and up halves of gate_up")
        for half, name in enumerate(("gate_layer", "proj")):
            out[f"{layer.removesuffix('gate_up')}{name}.{suffix}"] = t.chunk(2)[half] if part == "up" else t
    return out
