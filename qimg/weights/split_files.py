"""The text encoder, its vision tower and the VAE from single files, in place of a model folder's parts: ComfyUI's
(`qwen_2.5_vl_7b_fp8_scaled.safetensors`, `qwen_image_vae.safetensors`), llama.cpp's (`Qwen2.5-VL-7B-Instruct-
Q8_0.gguf` and its `mmproj` vision file, as stable-diffusion.cpp runs them) or diffusers' keys in one file.

The configs still come from a folder: the user's `--model`, or the one qimg ships for the variant the transformer
file is (configs.py). `check_files` reads headers only (each file is the part it is given for, its widths fit
the others', an Edit model has a vision tower, the tokenizer is there), so a wrong combination is one line before
any large file is read. Packed text-encoder weights (GGUF blocks, fp8) stay packed as the transformer's do
(unpacked once at load on the CPU or with --dequantize); the vision tower and the VAE, small, load dense.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch

from qimg.errors import QimgError, UsageError
from qimg.model import instruct_text, text, vision
from qimg.model.instruct_text import InstructEncoder
from qimg.model.quant import dequantize, packed_size
from qimg.model.qwen2 import Qwen2Config, Qwen2Model, remap_keys
from qimg.model.text import TextEncoder
from qimg.model.tokenizer import Tokenizer
from qimg.model.vae import QwenImageVAE, VAEConfig
from qimg.model.vision import VisionTower
from qimg.weights import gguf_file, shipped
from qimg.weights.comfy_files import (
    PARTS,
    TEXT_ARCHITECTURES,
    VISION_ARCHITECTURES,
    VISION_PROJECTOR,
    WAN_MARK,
    gguf_text_key,
    join_vision,
    latent_channels,
    mmproj_key,
    part_of,
    qwen3,
    text_size,
    wan_vae_key,
)
from qimg.weights.folders import Contents, ModelKind, check_keys, read_config
from qimg.weights.single_file import Weight, Weights, open_weights
from qimg.weights.text_encoder import configs, image_config
from qimg.weights.tokenizer import from_gguf, read_tokenizer
from qimg.weights.transformer import _linear, _pack_layer, _tensors, sha256

TEXT, VAE, VISION = "--text-encoder", "--vae", "--vision"
WANTED = {TEXT: "text encoder", VAE: "VAE", VISION: "vision tower"}
TOKENIZER_FOLDERS = ("qwen25_tokenizer", "tokenizer")  # looked for beside a safetensors text encoder (ComfyUI's name)


@dataclass(frozen=True)
class Files:
    """The single files that replace a folder's parts (None: the folder's own)."""

    text_encoder: Path | None = None
    vae: Path | None = None
    vision: Path | None = None

    def __bool__(self) -> bool:
        return any((self.text_encoder, self.vae, self.vision))


def gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == gguf_file.MAGIC


@contextmanager
def open_part(path: Path, option: str):
    """open_weights for a part's file, refusing a file that holds another part (or a vision file whose
    projector is not Qwen2.5-VL's) by name."""
    if option == VAE and path.suffix.lower() == ".gguf":
        raise UsageError(f"{VAE} {path}: qimg reads the VAE from .safetensors (Wan or diffusers names), not GGUF")
    archs = VISION_ARCHITECTURES if option == VISION else TEXT_ARCHITECTURES
    with open_weights(path, option, archs) as found:
        part = part_of(found.weights)
        if part != WANTED[option]:
            held = f"a {part}'s weights" if part else "no weights qimg knows"
            also = f" (pass it as {PARTS[part]})" if part else ""
            raise UsageError(f"{option} {path} holds {held}{also}, not a {WANTED[option]}'s")
        if option == VISION and found.container == "gguf":
            projector = gguf_file.read_header(path, option, archs)[0].get("clip.projector_type")
            if projector != VISION_PROJECTOR:
                raise UsageError(f"{option} {path}: its projector is {str(projector)[:40]!r}, not Qwen2.5-VL's "
                                 f"({VISION_PROJECTOR}); pass the mmproj file of Qwen2.5-VL-7B-Instruct")
        yield found


def text_weights(found: Weights) -> dict[str, Weight]:
    """The language model's weights by Qwen2Model key (lm_head and the vision tower left out); a name no map
    knows is kept as it is, for the key check to name."""
    out = {}
    for name, w in found.weights.items():
        key = gguf_text_key(name) if found.container == "gguf" else name
        if key is None:
            out[name] = w
        elif remap_keys(key) is not None:
            out[remap_keys(key)] = w
    return out


def dense(w: Weight) -> torch.Tensor:
    return w.read() if w.kind == "dense" else dequantize(w.kind, w.read(), w.shape, w.scale)


def load_language_model(path: Path, cfg: Qwen2Config, dtype: torch.dtype, device: torch.device,
                        unpack: bool) -> Qwen2Model:
    """Qwen2.5-VL's language model from a text encoder file; its packed linear layers stay packed unless
    `unpack`."""
    with open_part(path, TEXT) as found:
        with torch.device("meta"):
            module = Qwen2Model(cfg)
        return filled(module, text_weights(found), f"{TEXT} {path}", dtype, device, unpack)


def filled(module: torch.nn.Module, weights: dict[str, Weight], label: str, dtype: torch.dtype,
           device: torch.device, unpack: bool) -> torch.nn.Module:
    """A module built on the meta device, given a file's weights: the keys and shapes checked, its packed linear
    layers kept packed unless `unpack`, every tensor checked finite and the whole not all zero (one line naming
    `label` and the key otherwise); in eval mode, without gradients."""
    check_keys(label, module.state_dict(), {k: w.shape for k, w in weights.items()}, UsageError)
    packed = {n for n, w in weights.items() if w.kind != "dense" and not unpack and _linear(module, n)}
    for name in packed:
        _pack_layer(module, name, weights[name].kind, weights[name].scale is not None, dtype)
    state, contents = {}, Contents(UsageError)
    for name, w in weights.items():
        state.update(_tensors(name, w, w.kind, name in packed, dtype, device,
                              partial(contents.check, file=label, key=name)))
    contents.all_zero(label)
    module.load_state_dict(state, assign=True)
    return module.eval().requires_grad_(False)


def vision_source(files: Files) -> tuple[Path, str]:
    """The file the vision tower comes from: --vision, else the text encoder file (ComfyUI's holds visual.*)."""
    return (files.vision, VISION) if files.vision else (files.text_encoder, TEXT)


def vision_weights(found: Weights) -> dict[str, torch.Tensor]:
    """The vision tower's tensors, dense, by VisionTower key."""
    if found.container == "gguf":
        named = {mmproj_key(n) or n: dense(w) for n, w in found.weights.items()}
        return {vision.remap_keys(k) or k: t for k, t in join_vision(named).items()}
    return {vision.remap_keys(n): dense(w) for n, w in found.weights.items() if vision.remap_keys(n)}


def load_vision_tower(files: Files, cfg, dtype: torch.dtype, device: torch.device) -> VisionTower:
    path, option = vision_source(files)
    label = f"{option} {path}"
    with open_part(path, option) as found:
        tensors = vision_weights(found)
    with torch.device("meta"):
        module = VisionTower(cfg)
    check_keys(label, module.state_dict(), {k: tuple(t.shape) for k, t in tensors.items()}, UsageError)
    contents = Contents(UsageError)
    state = {k: contents.check(t, label, k).to(device=device, dtype=dtype) for k, t in tensors.items()}
    contents.all_zero(label)
    module.load_state_dict(state, assign=True)
    return module.eval().requires_grad_(False)


def vae_weights(found: Weights, cfg: VAEConfig) -> dict[str, Weight]:
    """The VAE's weights by diffusers name, from either naming."""
    if WAN_MARK not in found.weights:
        return dict(found.weights)
    return {wan_vae_key(n, cfg.num_res_blocks) or n: w for n, w in found.weights.items()}


def load_vae(path: Path, cfg: VAEConfig, dtype: torch.dtype, device: torch.device,
             only: tuple[str, ...] = ()) -> QwenImageVAE:
    """The VAE from one file (Wan or diffusers names); with `only`, just those key prefixes are read."""
    with torch.device("meta"):
        module = QwenImageVAE(cfg)
    with open_part(path, VAE) as found:
        return filled_dense(module, vae_weights(found, cfg), f"{VAE} {path}", dtype, device, only)


def filled_dense(module: torch.nn.Module, weights: dict[str, Weight], label: str, dtype: torch.dtype,
                 device: torch.device, only: tuple[str, ...] = ()) -> torch.nn.Module:
    """A module built on the meta device, given a file's weights unpacked (a VAE, a vision tower: nothing stays
    packed): the keys and shapes checked, every tensor checked finite and the whole not all zero (one line naming
    `label` and the key otherwise); with `only`, just those key prefixes read and loaded. In eval mode, without
    gradients (filled: the same with packed layers kept packed)."""
    check_keys(label, module.state_dict(), {k: w.shape for k, w in weights.items()}, UsageError)
    contents = Contents(UsageError)
    state = {k: contents.check(dense(w), label, k).to(device=device, dtype=dtype) for k, w in weights.items()
             if not only or k.startswith(only)}
    contents.all_zero(label)
    module.load_state_dict(state, assign=True, strict=not only)
    return module.eval().requires_grad_(False)


def tokenizer_place(files: Files, folder: Path, edits: bool) -> Path:
    """Where the tokenizer for a text encoder file is: a GGUF's own (the file); else the folder's (processor/ or
    tokenizer/), else own_tokenizer's (one beside the file, or the one qimg ships)."""
    path = files.text_encoder
    if gguf(path):
        return path
    inside = ("processor", "tokenizer") if edits else ("tokenizer",)
    where = next((p for p in (folder / name for name in inside) if _has_tokenizer(p)), None) or own_tokenizer(path)
    if where is None:
        raise UsageError(f"{TEXT} {path}: no tokenizer for it: a safetensors text encoder carries none, and the "
                         f"Qwen2.5 one qimg ships needs a vocabulary of {shipped.TOKENIZER_IDS} rows or more, not "
                         f"this file's {_vocabulary(path)}; put its model's tokenizer folder beside the file as "
                         "qwen25_tokenizer/, pass --model with its folder, or use a GGUF text encoder")
    return where


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json"))


def _vocabulary(path: Path) -> int | None:
    """The rows of a safetensors text encoder's token embedding, from its header."""
    with open_part(path, TEXT) as found:
        embed = text_weights(found).get("embed_tokens.weight")
    return embed.shape[0] if embed is not None else None


def own_tokenizer(path: Path) -> Path | None:
    """The tokenizer a safetensors text encoder goes with when no model folder gives one: a `qwen25_tokenizer/` or
    `tokenizer/` folder beside it (ComfyUI's copy: vocab.json, merges.txt, tokenizer_config.json), else the
    Qwen2.5 tokenizer qimg ships when the file's vocabulary has a row for each of its ids; None otherwise."""
    beside = next((p for p in (path.parent / name for name in TOKENIZER_FOLDERS) if _has_tokenizer(p)), None)
    if beside is not None:
        return beside
    return shipped.TOKENIZER if (_vocabulary(path) or 0) >= shipped.TOKENIZER_IDS else None


@cache
def shipped_tokenizer() -> Tokenizer:
    """The shipped tokenizer, read once per process (1-2 s): a run reads it to check the files, then to load."""
    return read_tokenizer(shipped.TOKENIZER)


def tokenizer_label(files: Files, folder: Path, edits: bool) -> str:
    """Which tokenizer a text encoder file's prompts go through, for --json and the metadata (no full paths)."""
    where = tokenizer_place(files, folder, edits)
    if where == files.text_encoder:
        return "the GGUF's own"
    if where == shipped.TOKENIZER:
        return "qimg's Qwen2.5 (shipped)"
    return f"{where.name}/ beside the file" if where.parent == files.text_encoder.parent else \
        f"the model folder's {where.name}/"


def tokenizer_for(files: Files, folder: Path, edits: bool) -> Tokenizer:
    """The tokenizer tokenizer_place finds, checked to read the prompt template's prefix as the model's does."""
    where = tokenizer_place(files, folder, edits)
    if where == files.text_encoder:
        tokenizer = from_gguf(gguf_file.read_header(where, TEXT, TEXT_ARCHITECTURES)[0], f"{TEXT} {where}")
    else:
        tokenizer = shipped_tokenizer() if where == shipped.TOKENIZER else read_tokenizer(where)
    template, drop = (instruct_text.SYSTEM, instruct_text.DROP) if edits else (text.TEMPLATE.split("{}")[0], text.DROP)
    prefix = len(tokenizer.ids([template])[0])
    if prefix != drop:
        raise UsageError(f"{where}: not Qwen2.5's tokenizer: it reads the prompt template's prefix as {prefix} "
                         f"tokens, not {drop}")
    return tokenizer


def text_files(files: Files, folder: Path, edits: bool) -> tuple[Path, ...]:
    """What the prompt embeddings depend on besides the text encoder's weights, for their fingerprint: the
    folder's tokenizer/; with a text encoder file, the vision file and the tokenizer it takes (edits: an Edit
    model's, ModelKind.edits)."""
    if not files.text_encoder:
        return (folder / "tokenizer",)
    place = tokenizer_place(files, folder, edits)
    return tuple(p for p in (files.vision, place) if p and p != files.text_encoder)


def files_provenance(files: Files, folder: Path, edits: bool) -> dict:
    """For the output's metadata and --json: each file's name, sha256 and format, by part; the text encoder's
    tokenizer (tokenizer_label; edits: an Edit model's, ModelKind.edits)."""
    info = {}
    for part, path, option in (("text_encoder", files.text_encoder, TEXT), ("vae", files.vae, VAE),
                               ("vision", files.vision, VISION)):
        if path:
            with open_part(path, option) as found:
                info[part] = {"name": path.name, "sha256": sha256(path), "format": found.format}
    if files.text_encoder:
        info["text_encoder"]["tokenizer"] = tokenizer_label(files, folder, edits)
    return info


def load_text_files(files: Files, folder: Path, kind: ModelKind, dtype: torch.dtype, device: torch.device,
                    unpack: bool) -> TextEncoder | InstructEncoder:
    """The prompt encoder (an Edit model's instruction encoder) from files, its configs from `folder`."""
    tokenizer = tokenizer_for(files, folder, kind.edits)
    encoder = folder / "text_encoder"
    if not kind.edits:
        try:
            cfg = Qwen2Config.from_dict(read_config(encoder))
        except (ValueError, TypeError) as e:
            raise QimgError(f"{encoder / 'config.json'}: {e}") from None
        return TextEncoder(tokenizer, load_language_model(files.text_encoder, cfg, dtype, device, unpack), device)
    image_cfg = image_config(folder)
    cfg, vision_cfg = configs(encoder, image_cfg)
    model = load_language_model(files.text_encoder, cfg, dtype, device, unpack)
    tower = load_vision_tower(files, vision_cfg, dtype, device)
    return InstructEncoder(tokenizer, model, tower, image_cfg, kind.plus, dtype, device)


def language_model_bytes(weights: dict[str, tuple[str, tuple[int, ...]]], dtype: torch.dtype, unpack: bool) -> int:
    """weights: Qwen2Model key -> (kind, shape). Packed linear layers (under layers.) at their packed size unless
    `unpack`; the embedding and the norms in dtype."""
    return sum(packed_size(kind, shape) if kind != "dense" and not unpack and name.startswith("layers.")
               and len(shape) == 2 else math.prod(shape) * dtype.itemsize for name, (kind, shape) in weights.items())


def text_weight_bytes(files: Files, edits: bool, dtype: torch.dtype, unpack: bool) -> int:
    """Bytes the text encoder file's weights take once loaded, from the headers: packed linear layers at their
    packed size unless `unpack`, everything else (and an Edit model's vision tower, always dense) in dtype."""
    with open_part(files.text_encoder, TEXT) as found:
        total = language_model_bytes({n: (w.kind, w.shape) for n, w in text_weights(found).items()}, dtype, unpack)
    if edits:
        path, option = vision_source(files)
        with open_part(path, option) as found:
            total += sum(math.prod(w.shape) for n, w in found.weights.items()
                         if (mmproj_key(n) if found.container == "gguf" else vision.remap_keys(n))) * dtype.itemsize
    return total


def check_files(files: Files, folder: Path, kind: ModelKind, transformer: Path | None = None) -> None:
    """Everything about the files that their headers tell, before any of them is read in full: each is the part
    it is given for (and readable, not truncated), the text encoder is as wide as the transformer takes (the
    --transformer file's txt_in, else the folder's config), an Edit model has a vision tower as wide, the
    tokenizer is there, and each part's keys and shapes fit the folder's configs."""
    if files.vision and not files.text_encoder:
        raise UsageError(f"{VISION} {files.vision} goes with --text-encoder (the vision tower of that text encoder)")
    if files.vision and not kind.edits:
        raise UsageError(f"{VISION} {files.vision}: {kind.display} reads no pictures (only an Edit model's text "
                         f"encoder has a vision tower); leave {VISION} out")
    if files.text_encoder:
        _check_text(files, folder, kind, transformer)
    if files.vae:
        try:
            cfg = VAEConfig.from_dict(read_config(folder / "vae"))
        except (ValueError, TypeError) as e:
            raise QimgError(f"{folder / 'vae' / 'config.json'}: {e}") from None
        with open_part(files.vae, VAE) as found:
            shapes = {k: w.shape for k, w in vae_weights(found, cfg).items()}
        z = latent_channels(shapes)
        if z is not None and z != cfg.z_dim:
            raise UsageError(f"{VAE} {files.vae} makes latents of {z} channels and the model's transformer takes "
                             f"{cfg.z_dim}: they are from different models")
        with torch.device("meta"):
            expected = QwenImageVAE(cfg).state_dict()
        check_keys(f"{VAE} {files.vae}", expected, shapes, UsageError)


def _width(path: Path, option: str, key: str, axis: int) -> int | None:
    """A tensor's size along `axis` from the file's header (raw names); None when it has no such tensor."""
    with open_part(path, option) as found:
        return found.weights[key].shape[axis] if key in found.weights else None


def _check_text(files: Files, folder: Path, kind: ModelKind, transformer: Path | None) -> None:
    try:
        config = read_config(folder / "text_encoder")
        cfg = Qwen2Config.from_dict(config)
        takes = read_config(folder / "transformer").get("joint_attention_dim", cfg.hidden_size)
    except (ValueError, TypeError) as e:
        raise QimgError(f"{folder / 'text_encoder' / 'config.json'}: {e}") from None
    where = f"the model's transformer ({folder})"
    if transformer is not None:
        with open_weights(transformer) as found:
            txt_in = found.weights.get("txt_in.weight")
        if txt_in is not None:
            takes, where = txt_in.shape[1], f"--transformer {transformer}"
    path = files.text_encoder
    with open_part(path, TEXT) as found:
        weights = text_weights(found)
        visual = [n for n in found.weights if vision.remap_keys(n)]
        width, is_qwen3 = text_size({n: w.shape for n, w in found.weights.items()})[0], qwen3(found.weights)
    if is_qwen3:  # a 2.1 encoder as wide as this
        raise UsageError(f"{TEXT} {path} is a Qwen3-VL text encoder (Qwen-Image-2.1's) and {where} is a Qwen-Image "
                         "20B one: they are from different models")
    if width is not None and width != takes:
        raise UsageError(f"{TEXT} {path} is {width} wide and {where} takes {takes}: they are from different "
                         "models (a Qwen-Image-2.1 text encoder with a 20B transformer?)")
    with torch.device("meta"):
        expected = Qwen2Model(cfg).state_dict()
    check_keys(f"{TEXT} {path}", expected, {k: w.shape for k, w in weights.items()}, UsageError)
    if kind.edits:
        if not files.vision and not visual:
            raise UsageError(f"{kind.display} edits with pictures, and {TEXT} {path} has no vision tower: pass "
                             f"{VISION} with Qwen2.5-VL's mmproj file, or a text encoder that holds visual.* "
                             "(ComfyUI's qwen_2.5_vl_7b)")
        out = _width(files.vision, VISION, "mm.2.weight", 0) if files.vision else \
            _width(path, TEXT, next((n for n in visual if n.endswith("merger.mlp.2.weight")), ""), 0)
        if out is not None and out != takes:
            raise UsageError(f"{vision_source(files)[1]} {vision_source(files)[0]}: its vision tower gives tokens "
                             f"{out} wide and the text encoder is {takes}: they are from different models")
    tokenizer_for(files, folder, kind.edits)
