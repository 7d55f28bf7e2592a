"""One file of transformer weights, as people download them: GGUF, or safetensors in bf16/fp16/fp32, plain fp8
or ComfyUI's scaled fp8, with bare diffusers keys or ComfyUI's `model.diffusion_model.` prefix (an all-in-one
checkpoint: only the keys under the prefix are the transformer's).

`open_weights` lists every weight with its format and shape, reading no tensor; each is read when asked. What
qimg cannot run correctly is refused by name (NVFP4, int8, block-wise scales, IQ/TQ types, another model), never
loaded approximately: diffusers, for one, loads scaled fp8 without its scales and silently gets wrong weights.
"""

import json
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from qimg.errors import QimgError, UsageError
from qimg.model.quant import FP8
from qimg.small_files import PICKLE_SUFFIXES, open_regular
from qimg.weights import gguf_file
from qimg.weights.folders import safetensors_files
from qimg.weights.lora_keys import split_key

PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI checkpoints, longest first
DENSE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
COMFY_FP8 = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}  # comfy_quant format -> safetensors dtype
LEGACY_MARKER = "scaled_fp8"  # ComfyUI's old scaled fp8: this tensor, and `<layer>.scale_weight` per layer
SCALES = (".scale_weight", ".weight_scale")  # legacy, comfy_quant: W = fp8 * scale
IGNORED = (".scale_input", ".input_scale")  # activation scales for fp8 matmuls; qimg computes in the model dtype
COMFY_QUANT = ".comfy_quant"  # per layer: uint8 JSON {"format": ...}


@dataclass(frozen=True)
class Weight:
    kind: str  # "dense", an fp8 format (F8_E4M3) or a GGUF block type (Q4_K)
    shape: tuple[int, ...]  # the tensor's shape in the model
    read: Callable[[], torch.Tensor]  # dense: a float tensor; packed: uint8 (rows, bytes per row)
    stored: str = ""  # the type in the file (BF16, F8_E4M3, Q4_K), for the format's description
    scale: torch.Tensor | None = None  # fp8: float32 scalar, W = fp8 * scale; None for plain fp8


@dataclass(frozen=True)
class Weights:
    path: Path
    container: str  # gguf, safetensors
    weights: dict[str, Weight]
    skipped: int = 0  # keys of other components in an all-in-one checkpoint
    scaling: str = ""  # scaled fp8's flavour: scaled_fp8 (legacy) or comfy_quant
    kinds: dict[str, int] = field(default_factory=dict)  # weight format -> parameters stored so

    @property
    def format(self) -> str:
        """What the file holds, for the output's metadata, most parameters first: `gguf Q4_K+Q6_K+BF16+F32`,
        `safetensors F8_E4M3+BF16 scaled_fp8`."""
        kinds = "+".join(sorted(self.kinds, key=lambda k: (-self.kinds[k], k)))
        whole = "all-in-one" if self.skipped else ""
        return " ".join(p for p in (self.container, kinds, self.scaling, whole) if p)


@contextmanager
def open_weights(path: Path, option: str = "--transformer", architectures: dict[str, str] = gguf_file.ARCHITECTURES):
    """The transformer weights of one file; their `read`s work inside the `with`. option: the option that named
    the file, for messages (--text-encoder, --vae, --vision read their files here too); architectures: the GGUF
    architectures taken."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"{option} {path} is a {path.suffix} file, the suffix of pickle files; qimg reads "
                         ".gguf and .safetensors only, because pickle files can run code")
    with open_regular(path, option, "; pass one .gguf or .safetensors file (the model folder goes to "
                      "--model)") as f:
        magic = f.read(4)
    if magic == gguf_file.MAGIC:
        yield _gguf(path, option, architectures)
        return
    with ExitStack() as stack:
        yield _safetensors(path, stack, option)


def _select(keys: list[str], path: Path, option: str) -> tuple[dict[str, str], int]:
    """{model key: file key}: every key of a bare file; of a prefixed (all-in-one) file only the prefixed ones.
    A LoRA's keys are refused by name: a LoRA changes a model's weights, it is not one."""
    adapter = next((k for k in keys if split_key(k)[1] not in (None, "alpha")), None)
    if adapter is not None:
        raise UsageError(f"{option} {path} looks like a LoRA (lora_A/lora_down keys such as {adapter[:80]}), "
                         "not a transformer's weights: use --lora")
    for prefix in PREFIXES:
        inside = [k for k in keys if k.startswith(prefix)]
        if inside:
            return {k[len(prefix):]: k for k in inside}, len(keys) - len(inside)
    if keys and all(k.startswith(("first_stage_model.", "cond_stage_model.", "text_encoders.", "vae.")) for k in keys):
        raise UsageError(f"{option} {path} holds no transformer weights (no keys under model.diffusion_model., "
                         "only another component's); pass the transformer's file")
    return {k: k for k in keys}, 0


def _counted(path, container, weights, skipped=0, scaling="") -> Weights:
    kinds = {}
    for w in weights.values():
        kinds[w.stored] = kinds.get(w.stored, 0) + math.prod(w.shape)
    return Weights(path, container, weights, skipped, scaling, kinds)


def _gguf(path: Path, option: str, architectures: dict[str, str]) -> Weights:
    try:
        _, infos = gguf_file.read_header(path, option, architectures)
    except RecursionError:
        raise UsageError(f"{option} {path}: its metadata is nested too deeply; the file is damaged") from None
    by_name = {t.name: t for t in infos}
    names, skipped = _select(list(by_name), path, option)
    weights = {}
    for name, key in names.items():
        info = by_name[key]
        weights[name] = Weight("dense" if info.kind in DENSE else info.kind, info.shape,
                               partial(gguf_file.read_tensor, path, info, option=option), info.kind)
    return _counted(path, "gguf", weights, skipped)


def _safetensors(path: Path, stack: ExitStack, option: str) -> Weights:
    from safetensors import SafetensorError, safe_open

    try:
        f = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        meta = f.metadata() or {}
        keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{option} {path} is neither a GGUF file nor a readable safetensors file ({e}); a "
                         "truncated download reads this way too") from None
    names, skipped = _select(keys, path, option)
    layers = _quant_metadata(meta, path, option)

    def tensor(name):
        try:
            return f.get_tensor(names[name])
        except (SafetensorError, OSError) as e:
            raise UsageError(f"{option} {path}: cannot read {name} ({e}); download it again") from None

    weights, scaling = {}, LEGACY_MARKER if LEGACY_MARKER in names else ""
    for name, key in names.items():
        if name == LEGACY_MARKER or name.endswith(SCALES + IGNORED + (COMFY_QUANT,)):
            continue
        dtype, shape = f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())
        layer = name.removesuffix(".weight")
        fmt = _comfy_format(layer, names, layers, tensor, path, option)
        if fmt is not None:
            scaling = "comfy_quant"
            if fmt not in COMFY_FP8:
                raise UsageError(f"{option} {path}: layer {layer} is {_quant_name(fmt)}, which qimg does not run "
                                 "(it reads fp8 e4m3fn and e5m2 with one scale per tensor); use an fp8 or GGUF file")
            if dtype != COMFY_FP8[fmt]:
                raise UsageError(f"{option} {path}: layer {layer} says {fmt} but its weight is {dtype}")
        if dtype in FP8:
            scale = next((s for s in (layer + ".scale_weight", layer + ".weight_scale") if s in names), None)
            weights[name] = Weight(dtype, shape, partial(_fp8_bytes, tensor, name), dtype,
                                   None if scale is None else _scalar(tensor(scale), scale, path, option))
        elif dtype in DENSE:
            weights[name] = Weight("dense", shape, partial(tensor, name), dtype)
        elif dtype in ("I8", "U8"):
            raise UsageError(f"{option} {path}: {name} is int8 ({dtype}), which qimg does not run; use an fp8, "
                             "bf16 or GGUF file")
        else:
            raise UsageError(f"{option} {path}: {name} is of type {dtype}, which qimg does not read")
    return _counted(path, "safetensors", weights, skipped, scaling)


def _fp8_bytes(tensor, name: str) -> torch.Tensor:
    return tensor(name).view(torch.uint8)


def _scalar(t: torch.Tensor, name: str, path: Path, option: str) -> torch.Tensor:
    if t.numel() != 1:
        raise UsageError(f"{option} {path}: {name} holds {t.numel()} scales (shape {tuple(t.shape)}): block-wise "
                         "or per-channel scales are not supported, only one scale per tensor")
    scale = t.float().reshape(())
    if not 0 < float(scale) < math.inf:
        raise UsageError(f"{option} {path}: the scale {name} is {float(scale)}, not a positive finite number; "
                         "the file is damaged: download it again")
    return scale


def _quant_metadata(meta: dict, path: Path, option: str) -> dict:
    """The header's `_quantization_metadata` layers: {layer: {"format": ...}} (ComfyUI's mixed files)."""
    text = meta.get("_quantization_metadata")
    if text is None:
        return {}
    try:
        layers = json.loads(text).get("layers", {})
    except (ValueError, AttributeError, RecursionError):
        raise UsageError(f"{option} {path}: its _quantization_metadata is not a JSON object") from None
    if not isinstance(layers, dict):
        raise UsageError(f"{option} {path}: _quantization_metadata.layers is not an object")
    return {_strip(k): v for k, v in layers.items()}


def _strip(key: str) -> str:
    return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)


def _comfy_format(layer: str, names: dict, layers: dict, tensor, path: Path, option: str) -> str | None:
    """A layer's comfy_quant format (float8_e4m3fn, nvfp4, ...) from its `.comfy_quant` tensor or the header."""
    entry = layers.get(layer)
    if layer + COMFY_QUANT in names:
        raw = tensor(layer + COMFY_QUANT)
        try:
            entry = json.loads(bytes(raw.view(torch.uint8).flatten()[:65536].tolist()))
        except (ValueError, RecursionError):
            raise UsageError(f"{option} {path}: {layer}{COMFY_QUANT} is not JSON") from None
    if entry is None:
        return None
    fmt = entry.get("format") if isinstance(entry, dict) else None
    if not isinstance(fmt, str):
        raise UsageError(f"{option} {path}: layer {layer}'s comfy_quant entry names no format")
    return fmt


def _quant_name(fmt: str) -> str:
    if "nvfp4" in fmt.lower():
        return f"NVFP4 ({fmt})"
    if "int8" in fmt.lower():
        return f"int8 ({fmt})"
    return repr(fmt[:40])


@contextmanager
def folder_weights(folder: Path):
    """A model folder's dense safetensors weights as `Weights` (what `--quantize` packs at load)."""
    from safetensors import SafetensorError, safe_open

    with ExitStack() as stack:
        weights = {}
        for file in safetensors_files(folder):
            try:
                f = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                for key in f.keys():
                    sliced = f.get_slice(key)
                    weights[key] = Weight("dense", tuple(sliced.get_shape()), partial(f.get_tensor, key),
                                          sliced.get_dtype())
            except (SafetensorError, OSError) as e:
                raise QimgError(f"{file} is not a readable safetensors file ({e}); download it again") from None
        yield _counted(folder, "safetensors", weights)
