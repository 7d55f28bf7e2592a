"""A tiny Qwen-Image-2.1 folder's parts written as the single files ComfyUI users have: the transformer in one
file, the Qwen3-VL text encoder with its vision tower (ComfyUI's qwen3vl_8b_*.safetensors keep transformers'
names, `model.language_model.*` and `model.visual.*`: comfy/sd.py detects Qwen3-VL by
`model.visual.deepstack_merger_list.0.norm.weight`; stable-diffusion.cpp's scripts/convert_qwen3_vl.py and
ComfyUI's loaded module use `model.*` and `visual.*`), scaled fp8 as ComfyUI's convert_old_quants reads it, and the
RGBA VAE in diffusers' names as one file."""

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from split_layouts import folder_tensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def comfy_names(key: str) -> str:
    """transformers' Qwen3-VL key -> ComfyUI's module name (sd.cpp's convert_qwen3_vl.py does this rewrite)."""
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    return key.replace("model.language_model.", "model.", 1)


def text_encoder21(folder: Path, path: Path, comfy: bool = False, vision: bool = True) -> Path:
    """The text encoder in one file (transformers' names, or ComfyUI's with `comfy`); without `vision` the
    visual.* weights are left out."""
    state = folder_tensors(folder / "text_encoder")
    state = {(comfy_names(k) if comfy else k): v.contiguous() for k, v in state.items()
             if vision or "visual." not in k}
    save_file(state, str(path))
    return path


def vision21(folder: Path, path: Path) -> Path:
    """The vision tower alone (`visual.*`), for --vision."""
    state = folder_tensors(folder / "text_encoder")
    save_file({comfy_names(k): v.contiguous() for k, v in state.items() if k.startswith("model.visual.")}, str(path))
    return path


def scaled_fp8_text_encoder21(folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """ComfyUI's legacy scaled fp8: `scaled_fp8` marker, each language-model linear float8_e4m3fn with a float32
    `.scale_weight`; returns the weights the file holds, dequantized, under the folder's names."""
    state, held = folder_tensors(folder / "text_encoder"), {}
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in state.items():
        if k.startswith("model.language_model.layers.") and k.endswith("proj.weight"):
            scale = v.abs().max().float() / 448
            q = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k], out[k.removesuffix(".weight") + ".scale_weight"] = q, scale.reshape(())
            held[k] = q.float() * scale
        else:
            out[k], held[k] = v.contiguous(), v
    save_file(out, str(path))
    return held


def files21(folder: Path, out: Path, name: str = "qwen_image_2.1_fp32.safetensors", comfy: bool = False) -> list[Path]:
    """transformer, text encoder (with the folder's tokenizer beside it as qwen25_tokenizer/, as ComfyUI keeps
    one), VAE: the three files a ComfyUI user has."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in folder_tensors(folder / "transformer").items()}, str(out / name))
    text_encoder21(folder, out / "qwen3vl_8b_fp32.safetensors", comfy=comfy)
    save_file(folder_tensors(folder / "vae"), str(out / "qwen_image_2.1_vae_fp32.safetensors"))
    tokenizer = out / "qwen25_tokenizer"
    tokenizer.mkdir(exist_ok=True)
    for file in TOKENIZER_FILES:
        if (folder / "processor" / file).is_file():
            shutil.copy(folder / "processor" / file, tokenizer / file)
    return [out / name, out / "qwen3vl_8b_fp32.safetensors", out / "qwen_image_2.1_vae_fp32.safetensors"]
