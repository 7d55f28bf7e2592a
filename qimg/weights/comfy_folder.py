"""`--model DIR` on a folder that is no diffusers model: ComfyUI's models folder (`diffusion_models/` or `unet/`,
`text_encoders/` or `clip/`, `vae/`) or a folder of loose files. Each .safetensors and .gguf file is told by its
header (comfy_files.part_of) and kept as a candidate for its part only when it fits the transformer chosen (a
transformer qimg ships configs for): a text encoder of its family (Qwen2.5-VL for the 20B models, Qwen3-VL for
Qwen-Image-2.1) as wide as it takes, a VAE making the latents it takes (Qwen-Image's 16 channels, Wan 2.1 or
diffusers' names; 2.1's RGBA VAE, diffusers' names), Qwen2.5-VL's mmproj for a 20B Edit model. One candidate per
part is taken; several are listed, for the --transformer, --text-encoder, --vae or --vision choice."""

import functools
from dataclasses import dataclass
from pathlib import Path

from qimg.errors import QimgError, UsageError, listing
from qimg.weights import gguf_file
from qimg.weights.comfy_files import (
    PARTS,
    TEXT_ARCHITECTURES,
    VISION_ARCHITECTURES,
    WAN_MARK,
    latent_channels,
    part_of,
    qwen3,
    text_size,
)
from qimg.weights.folders import model_kind, read_config
from qimg.weights.single_file import open_weights

SUBFOLDERS = {"transformer": ("diffusion_models", "unet"), "text encoder": ("text_encoders", "clip"),
              "VAE": ("vae",), "vision tower": ("text_encoders", "clip")}
SUFFIXES = (".safetensors", ".gguf")
ARCHITECTURES = {**gguf_file.ARCHITECTURES, **TEXT_ARCHITECTURES, **VISION_ARCHITECTURES}
VAE_MARKS = (WAN_MARK, "decoder.mid_block.resnets.0.norm1.gamma")  # Wan 2.1 names, diffusers' Qwen-Image names


def holds_files(folder: Path) -> bool:
    """Whether a folder without model_index.json is one to look in: ComfyUI's part folders, or loose weight files
    (a damaged diffusers folder is neither, and is told so)."""
    subfolders = {"diffusion_models", "unet", "text_encoders", "clip"}  # not vae/: a diffusers folder has one too
    return any((folder / sub).is_dir() for sub in subfolders) or \
        any(f.suffix.lower() in SUFFIXES and f.is_file() for f in folder.iterdir())


def _read(path: Path) -> tuple[str | None, dict, str]:
    """(part, {name: shape}, why not) of a file from its header: (None, {}, the read error) for a file qimg cannot
    open (a LoRA, another model's GGUF, a damaged file). Read once per version of the file (a job looks twice: to
    check the model, then to open the engine)."""
    stat = path.stat()
    part, shapes, _, error = _header(path, stat.st_size, stat.st_mtime_ns)
    return part, shapes, error


@functools.lru_cache(maxsize=64)
def _header(path: Path, size: int, mtime: int) -> tuple[str | None, dict, str, str]:
    try:
        with open_weights(path, "", ARCHITECTURES) as found:  # no option named it: the messages start at the path
            shapes, fmt = {k: w.shape for k, w in found.weights.items()}, found.format
    except QimgError as e:
        return None, {}, "", str(e).strip()
    return part_of(shapes), shapes, fmt, ""


def describe_file(path: Path) -> dict | None:
    """`qimg info` on a model part's file: which part, the option that takes it, its format and what its shapes
    say (for a transformer, the variant qimg takes it for); None for a file that is no part qimg reads. A GGUF file
    qimg cannot open is refused with the reason (truncated, damaged, another architecture)."""
    from qimg.weights.shipped import architecture, shipped_folder

    stat = path.stat()
    part, shapes, fmt, error = _header(path, stat.st_size, stat.st_mtime_ns)
    if error and path.suffix.lower() == ".gguf":  # a truncated or damaged GGUF says so (a LoRA is .safetensors)
        raise UsageError(error)
    if part is None:
        return None
    info = {"file": path.name, "part": part, "option": PARTS[part], "format": fmt}
    from qimg.weights.split21 import describe21

    if (more := describe21(path, part, shapes)) is not None:  # Qwen-Image-2.1's transformer and text encoder
        return info | more
    if part == "transformer" and "txt_in.weight" in shapes and "img_in.weight" in shapes:
        blocks, width, text = architecture(path)
        info |= {"blocks": blocks, "width": width, "text_width": text,
                 "variant": shipped_folder(path).name if _ships(path) else None}
    elif part == "text encoder":
        width, layers = text_size(shapes)
        info |= {"width": width, "layers": layers,
                 "vision_tower": any(k.startswith(("visual.", "model.visual.")) for k in shapes),
                 "tokenizer": "in the file" if path.suffix.lower() == ".gguf" else _tokenizer(path)}
    elif part == "VAE":
        info |= {"names": "Wan 2.1" if WAN_MARK in shapes else "diffusers",
                 "latent_channels": latent_channels(shapes)}
    return info


def _tokenizer(path: Path) -> str:
    """Which tokenizer a safetensors text encoder goes with when no model folder gives one."""
    from qimg.weights.shipped import TOKENIZER
    from qimg.weights.split_files import own_tokenizer

    where = own_tokenizer(path)
    if where is None:
        return "none: not in the file, none beside it, and the vocabulary is too small for qimg's Qwen2.5 one"
    return "qimg's Qwen2.5 (shipped)" if where == TOKENIZER else f"{where.name}/ beside the file"


@dataclass(frozen=True)
class Takes:
    """What the chosen transformer takes of the other parts, from its header and the configs qimg ships for it."""

    text_width: int
    qwen3: bool  # Qwen-Image-2.1: a Qwen3-VL text encoder, and its VAE in diffusers' names; else Qwen2.5-VL
    channels: int  # the latent channels of its VAE
    vision: bool  # look for an mmproj vision tower: a 20B Edit model (2.1's is in its text encoder file)


def taken_by(transformer: Path) -> Takes:
    from qimg.weights.shipped import architecture, architecture21, shipped_folder

    folder, arch21 = shipped_folder(transformer), architecture21(transformer)
    return Takes(text_width=(arch21 or architecture(transformer))[2], qwen3=arch21 is not None,
                 channels=read_config(folder / "vae")["z_dim"], vision=model_kind(folder).edits and arch21 is None)


def _fits(part: str, shapes: dict, takes: Takes) -> bool:
    if part == "text encoder":
        return text_size(shapes)[0] == takes.text_width and qwen3(shapes) == takes.qwen3
    if part == "VAE":
        return any(m in shapes for m in VAE_MARKS) and latent_channels(shapes) == takes.channels
    return "v.blk.0.attn_q.weight" in shapes  # the vision tower: Qwen2.5-VL's mmproj


def _unreadable(path: Path, part: str, shapes: dict, takes: Takes) -> str:
    """Why a file that fits cannot be read as that part after all (ComfyUI's own 2.1 VAE); "" when it can."""
    from qimg.weights.split21 import no_wan_names

    if part != "VAE" or not takes.qwen3:
        return ""
    try:
        no_wan_names(path, shapes)
    except UsageError as e:
        return str(e)
    return ""


def _files(folder: Path, part: str) -> list[Path]:
    places = [folder / sub for sub in SUBFOLDERS[part] if (folder / sub).is_dir()] or [folder]
    return sorted({f for place in places for f in place.rglob("*") if f.suffix.lower() in SUFFIXES and f.is_file()})


def pick(folder: Path, given: tuple) -> tuple[Path | None, ...]:
    """(transformer, text encoder, VAE, vision tower) for `folder`; `given`: the files the options gave, in that
    order (None: find it). A part with no candidate, or several, is a UsageError (exit 2) naming them; the vision
    tower is optional (ComfyUI's text encoder holds one), and looked for only for a 20B Edit model."""
    chosen = list(given)
    order = ("transformer", "text encoder", "VAE", "vision tower")
    takes = None
    for i, part in enumerate(order):
        if chosen[i] is None and (part != "vision tower" or takes.vision):  # only an Edit model reads pictures
            found, skipped = [], []
            for f in _files(folder, part):
                kind, shapes, error = _read(f)
                fits = kind == part and (_ships(f) if part == "transformer" else _fits(part, shapes, takes))
                error = error or (_unreadable(f, part, shapes, takes) if fits else "")
                found += [f] if fits and not error else []
                skipped += [error] if error else []
            if len(found) > 1:
                raise UsageError(f"{folder} has {len(found)} files that fit as the {part}: "
                                 f"{listing([str(f.relative_to(folder)) for f in found])}; choose one with "
                                 f"{PARTS[part]} FILE")
            if not found and part != "vision tower":
                raise UsageError(f"{folder} is neither a diffusers model folder (no model_index.json) nor holds a "
                                 f"Qwen-Image {part} file (looked in {', '.join(f'{s}/' for s in SUBFOLDERS[part])} "
                                 f"or the folder itself); pass it with {PARTS[part]} FILE"
                                 + (f" (skipped: {'; '.join(skipped[:3])})" if skipped else ""))
            chosen[i] = found[0] if found else None
        if part == "transformer":
            takes = taken_by(chosen[0])  # one qimg has the configs for
    return tuple(chosen)


def _ships(path: Path) -> bool:
    from qimg.weights.shipped import shipped_folder

    try:
        shipped_folder(path)
    except QimgError:
        return False
    return True
