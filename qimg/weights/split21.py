"""Qwen-Image-2.1's text encoder (Qwen3-VL-8B, its vision tower in the same file) and RGBA VAE from single files,
in place of a model folder's parts, as split_files.py does for the 20B models.

The text encoder file is ComfyUI's (`qwen3vl_8b_bf16.safetensors`, fp8 and scaled fp8 included): it keeps
transformers' names (`model.language_model.*`, `model.visual.*`, `lm_head.weight`), which ComfyUI renames on load
(comfy/sd.py tells Qwen3-VL by `model.visual.deepstack_merger_list.0.norm.weight`; comfy/text_encoders/qwen3vl.py
is `model` = Llama2_ plus `visual`); files already in ComfyUI's own names (`model.layers.*`, `visual.*`, as
stable-diffusion.cpp's scripts/convert_qwen3_vl.py writes them) are read too. The vision tower is inside that file,
or in a `--vision` safetensors of `visual.*` alone. The VAE is diffusers' AutoencoderKLQwenImage21 names in one
file. Packed linear layers of the language model (fp8) stay packed as the 20B text encoder's do; the vision tower
and the VAE, small, load dense. `check_files21` reads headers only.
"""

import math
from pathlib import Path

import torch

from qimg.errors import UsageError
from qimg.model import qwen3vl, qwen3vl_vision
from qimg.model.qwen3vl import Qwen3VLTextModel
from qimg.model.qwen3vl_vision import Qwen3VLEncoder, Qwen3VLVisionTower
from qimg.model.qwen21_prompt import PromptEncoder21
from qimg.model.tokenizer import Tokenizer
from qimg.model.vae21 import QwenImage21VAE, VAE21Config
from qimg.weights.comfy_files import WAN_MARK, qwen3
from qimg.weights.folders import check_keys
from qimg.weights.qwen3vl import configs, load_image_config
from qimg.weights.single_file import Weight, open_weights
from qimg.weights.split_files import TEXT, TOKENIZER_FOLDERS, VAE, VISION, Files, filled, filled_dense, gguf, open_part
from qimg.weights.split_files import language_model_bytes as _packed_bytes
from qimg.weights.tokenizer import read_tokenizer
from qimg.weights.transformer import sha256

# Qwen3-VL's tokenizer: Qwen2's BPE (the shipped qwen2.5 vocab.json and merges.txt) with Qwen3's 26 added tokens
# (151643-151668: Qwen2.5-VL's 22, then <tool_response>, </tool_response>, <think>, </think>).
QWEN3_TOKENIZER = Path(__file__).resolve().parent / "tokenizers" / "qwen3-vl"
QWEN3_IDS = 151669


def canonical(name: str) -> str | None:
    """A text encoder file's key in transformers' names (`model.language_model.*`, `model.visual.*`), from those
    or ComfyUI's own (`model.*`, `visual.*`); None for what neither half reads (lm_head)."""
    if name.startswith(("model.language_model.", "model.visual.")):
        return name
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name.removeprefix("model.")
    return None


def halves(weights: dict[str, Weight]) -> tuple[dict[str, Weight], dict[str, Weight]]:
    """(language model, vision tower) weights by their modules' keys; the final norm and lm_head left out."""
    text, vision = {}, {}
    for name, w in weights.items():
        key = canonical(name)
        if key is None:
            continue
        if qwen3vl.remap_keys(key):
            text[qwen3vl.remap_keys(key)] = w
        elif qwen3vl_vision.remap_keys(key):
            vision[qwen3vl_vision.remap_keys(key)] = w
    return text, vision


def no_gguf(path: Path, option: str) -> None:
    if gguf(path):
        raise UsageError(f"{option} {path}: qimg reads Qwen-Image-2.1's text encoder and vision tower from "
                         "safetensors (ComfyUI's qwen3vl_8b files or transformers' names), not llama.cpp GGUF yet")


def vision_file(files: Files) -> tuple[Path, str]:
    return (files.vision, VISION) if files.vision else (files.text_encoder, TEXT)


def load_encoder21(files: Files, folder: Path, dtype: torch.dtype, device: torch.device,
                   unpack: bool) -> Qwen3VLEncoder:
    """Qwen3-VL from the files, its configs from folder/text_encoder; packed layers stay packed unless `unpack`."""
    text_cfg, vision_cfg = configs(folder / "text_encoder")
    label = f"{TEXT} {files.text_encoder}"
    with open_part(files.text_encoder, TEXT) as found:
        weights, inside = halves(found.weights)
        with torch.device("meta"):
            text = Qwen3VLTextModel(text_cfg)
        text = filled(text, weights, label, dtype, device, unpack)
        if not files.vision:
            tower = _tower(inside, vision_cfg, label, dtype, device)
    if files.vision:
        with open_part(files.vision, VISION) as found:
            tower = _tower(halves(found.weights)[1], vision_cfg, f"{VISION} {files.vision}", dtype, device)
    return Qwen3VLEncoder(text, tower).eval().requires_grad_(False)


def _tower(weights: dict[str, Weight], cfg, label: str, dtype: torch.dtype, device: torch.device):
    with torch.device("meta"):
        tower = Qwen3VLVisionTower(cfg)
    return filled_dense(tower, weights, label, dtype, device)


def load_prompt_encoder21(files: Files, folder: Path, dtype: torch.dtype, device: torch.device,
                          unpack: bool) -> PromptEncoder21:
    image_cfg = load_image_config(folder / "processor", configs(folder / "text_encoder")[1])
    encoder = load_encoder21(files, folder, dtype, device, unpack)
    return PromptEncoder21(tokenizer21(files, folder), encoder, image_cfg, dtype, device)


def load_vae21_file(path: Path, cfg: VAE21Config, dtype: torch.dtype, device: torch.device,
                    only: tuple[str, ...] = ()) -> QwenImage21VAE:
    """The RGBA VAE from one file of diffusers' names; with `only`, just those key prefixes are read."""
    with torch.device("meta"):
        module = QwenImage21VAE(cfg)
    with open_part(path, VAE) as found:
        no_wan_names(path, found.weights)
        return filled_dense(module, found.weights, f"{VAE} {path}", dtype, device, only)


def vae_shapes(path: Path, weights: dict[str, Weight]) -> dict[str, tuple]:
    no_wan_names(path, weights)
    return {k: w.shape for k, w in weights.items()}


def no_wan_names(path: Path, names) -> None:
    """Refuse a 2.1 VAE file in ComfyUI's Wan-style names (its 2.1 VAE is in Wan 2.2's layout): no map reads it."""
    if WAN_MARK in names:
        raise UsageError(f"{VAE} {path} is in ComfyUI's Wan-style VAE names, which qimg reads for Qwen-Image's VAE "
                         "only; for Qwen-Image-2.1 pass the VAE in diffusers' names (the model's vae/ weights as one "
                         "file) or --model with its folder")


# --- the tokenizer --------------------------------------------------------------------------------------------


def tokenizer_place21(files: Files, folder: Path) -> Path:
    """Where a text encoder file's tokenizer is: the model folder's processor/ (with --model), else a
    `qwen25_tokenizer/` or `tokenizer/` folder beside the file (ComfyUI's), else the Qwen3-VL one qimg ships."""
    beside = (folder / "processor", *(files.text_encoder.parent / name for name in TOKENIZER_FOLDERS))
    found = next((p for p in beside if any((p / f).is_file() for f in ("tokenizer.json", "vocab.json"))), None)
    return found or QWEN3_TOKENIZER


def tokenizer21(files: Files, folder: Path) -> Tokenizer:
    where = tokenizer_place21(files, folder)
    if where == QWEN3_TOKENIZER:
        from qimg.weights.shipped import TOKENIZER

        return read_tokenizer(where, vocabulary=TOKENIZER)
    return read_tokenizer(where)


def tokenizer_label21(files: Files, folder: Path) -> str:
    where = tokenizer_place21(files, folder)
    if where == QWEN3_TOKENIZER:
        return "qimg's Qwen3-VL (shipped)"
    return f"the model folder's {where.name}/" if where.parent == folder else f"{where.name}/ beside the file"


def text_files21(files: Files, folder: Path) -> tuple[Path, ...]:
    """What prompt embeddings depend on besides the text encoder file: the vision file, the tokenizer."""
    return tuple(p for p in (files.vision, tokenizer_place21(files, folder)) if p)


def files_provenance21(files: Files) -> dict:
    info = {}
    for part, path in (("text_encoder", files.text_encoder), ("vae", files.vae), ("vision", files.vision)):
        if path:
            with open_weights(path, {"text_encoder": TEXT, "vae": VAE, "vision": VISION}[part]) as found:
                info[part] = {"name": path.name, "sha256": sha256(path), "format": found.format}
    return info


def text_bytes21(files: Files, dtype: torch.dtype, unpack: bool) -> int:
    """The text encoder file's weights once loaded (packed layers packed unless `unpack`, the vision tower dense),
    from the headers."""
    with open_part(files.text_encoder, TEXT) as found:
        text, vision = halves(found.weights)
    total = _packed_bytes({n: (w.kind, w.shape) for n, w in text.items()}, dtype, unpack)
    if files.vision:
        with open_part(files.vision, VISION) as found:
            vision = halves(found.weights)[1]
    return total + sum(math.prod(w.shape) for w in vision.values()) * dtype.itemsize


# --- checks from the headers ----------------------------------------------------------------------------------


def check_files21(files: Files, folder: Path, transformer: Path | None = None) -> None:
    """Everything the files' headers tell, before any is read in full: each is the part it is given for, the text
    encoder is as wide as the transformer takes (the --transformer file's txt_in, else the folder's config), its
    vision tower is there and as wide, the VAE makes the latents the transformer takes, the tokenizer has an id for
    each token the prompt template needs, and every key and shape fits the folder's configs."""
    if files.vision and not files.text_encoder:
        raise UsageError(f"{VISION} {files.vision} goes with --text-encoder (the vision tower of that text encoder)")
    takes, channels, where = _transformer_widths(folder, transformer)
    if files.text_encoder:
        _check_text21(files, folder, takes, where)
    if files.vae:
        cfg = _vae_config(folder)
        with open_part(files.vae, VAE) as found:
            shapes = vae_shapes(files.vae, found.weights)
        z = shapes.get("post_quant_conv.weight", (0, 0))[1]
        if z != channels:
            raise UsageError(f"{VAE} {files.vae} makes latents of {z} channels and {where} takes {channels}: they "
                             "are from different models (Qwen-Image's 16-channel VAE with Qwen-Image-2.1?)")
        with torch.device("meta"):
            expected = QwenImage21VAE(cfg).state_dict()
        check_keys(f"{VAE} {files.vae}", expected, shapes, UsageError)


def _vae_config(folder: Path) -> VAE21Config:
    from qimg.weights.qwen21 import vae21_config

    return vae21_config(folder)


def _transformer_widths(folder: Path, transformer: Path | None) -> tuple[int, int, str]:
    """(text width, latent channels) the transformer takes, and which transformer that is, for messages."""
    from qimg.weights.qwen21 import transformer21_config

    cfg = transformer21_config(folder)
    takes, channels, where = cfg.context_in_dim, cfg.in_channels, f"the model's transformer ({folder})"
    if transformer is not None:
        with open_weights(transformer) as found:
            txt_in, img_in = found.weights.get("txt_in.in_layer.weight"), found.weights.get("img_in.weight")
        if txt_in is not None and img_in is not None:
            takes, channels, where = txt_in.shape[1], img_in.shape[1], f"--transformer {transformer}"
    return takes, channels, where


def _check_text21(files: Files, folder: Path, takes: int, where: str) -> None:
    path = files.text_encoder
    no_gguf(path, TEXT)
    if files.vision:
        no_gguf(files.vision, VISION)
    text_cfg, vision_cfg = configs(folder / "text_encoder")
    with open_part(path, TEXT) as found:
        text, vision = halves(found.weights)
    width = text["embed_tokens.weight"].shape[1] if "embed_tokens.weight" in text else None
    if width is not None and width != takes:
        raise UsageError(f"{TEXT} {path} is {width} wide and {where} takes {takes}: they are from different models "
                         "(a Qwen2.5-VL text encoder with a Qwen-Image-2.1 transformer?)")
    if not qwen3(text):
        raise UsageError(f"{TEXT} {path} is not a Qwen3-VL text encoder (no q_norm in its attention): "
                         "Qwen-Image-2.1 needs Qwen3-VL-8B (ComfyUI's qwen3vl_8b files)")
    with torch.device("meta"):
        expected = Qwen3VLTextModel(text_cfg).state_dict()
    check_keys(f"{TEXT} {path}", expected, {k: w.shape for k, w in text.items()}, UsageError)
    source, option = vision_file(files)
    if files.vision:
        with open_part(files.vision, VISION) as found:
            vision = halves(found.weights)[1]
    if not vision:
        raise UsageError(f"{TEXT} {path} has no vision tower (model.visual.*), which Qwen-Image-2.1 needs for its "
                         f"prompts too: pass the full Qwen3-VL text encoder, or {VISION} with a file of its "
                         "visual.* weights")
    out = vision.get("merger.linear_fc2.weight")
    if out is not None and out.shape[0] != takes:
        raise UsageError(f"{option} {source}: its vision tower gives tokens {out.shape[0]} wide and the text encoder "
                         f"is {takes}: they are from different models")
    with torch.device("meta"):
        expected = Qwen3VLVisionTower(vision_cfg).state_dict()
    check_keys(f"{option} {source}", expected, {k: w.shape for k, w in vision.items()}, UsageError)
    rows = text["embed_tokens.weight"].shape[0] if "embed_tokens.weight" in text else 0
    if tokenizer_place21(files, folder) == QWEN3_TOKENIZER and rows < QWEN3_IDS:
        raise UsageError(f"{TEXT} {path}: no tokenizer for it: the Qwen3-VL one qimg ships needs a vocabulary of "
                         f"{QWEN3_IDS} rows or more, not this file's {rows}; put its model's tokenizer folder beside "
                         "the file as qwen25_tokenizer/, or pass --model with its folder")


def describe21(path: Path, part: str, shapes: dict[str, tuple]) -> dict | None:
    """`qimg info` on a Qwen-Image-2.1 transformer or Qwen3-VL text encoder file (shapes: its header's): what
    comfy_folder.describe_file says of the 20B models' files; None for a file of another model."""
    from qimg.errors import QimgError
    from qimg.weights.shipped import architecture21, shipped_folder

    if part == "transformer" and "txt_in.in_layer.weight" in shapes:
        blocks, width, text = architecture21(path)
        try:
            variant = shipped_folder(path).name
        except QimgError:
            variant = None
        return {"blocks": blocks, "width": width, "text_width": text, "variant": variant}
    if part != "text encoder":
        return None
    text, vision = halves({n: Weight("dense", s, None) for n, s in shapes.items()})
    if not qwen3(text):
        return None
    rows, width = text.get("embed_tokens.weight", Weight("dense", (0, 0), None)).shape
    beside = next((name for name in TOKENIZER_FOLDERS if (path.parent / name).is_dir()), None)
    tokenizer = f"{beside}/ beside the file" if beside else "qimg's Qwen3-VL (shipped)" if rows >= QWEN3_IDS else \
        "none: not in the file, none beside it, and the vocabulary is too small for qimg's Qwen3-VL one"
    return {"model": "Qwen3-VL (Qwen-Image-2.1)", "width": width, "layers": len({k.split(".")[1] for k in text
                                                                                 if k.startswith("layers.")}),
            "vision_tower": bool(vision), "tokenizer": tokenizer}
