"""Where the transformer's weights come from, and whether they stay packed.

By default the model folder's dense safetensors (weights.load_module). With `--transformer FILE` the weights
come from one file (single_file.py: GGUF, fp8, bf16) and the config from the folder; with `--quantize fp8` a
dense folder's block weights are packed as scaled fp8 while loading. Packed linear layers (GGUF blocks, fp8)
stay packed in memory and unpack on each forward (model/quant.py), except with `--dequantize` (the default on
the CPU, where unpacking every step costs more than the memory it saves): then each weight unpacks once, here.
"""

import dataclasses
import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from qimg.errors import QimgError, QimgWarning, UsageError
from qimg.model.quant import BLOCKS, FP8, PackedLinear, dequantize, packed_size, quantize_fp8
from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.model.transformer21 import QwenImage21Transformer, Transformer21Config
from qimg.option_values import QUANTIZE
from qimg.small_files import sha256_of
from qimg.weights.fingerprint import fingerprint
from qimg.weights.folders import Contents, check_keys, load_module
from qimg.weights.single_file import Weight, Weights, folder_weights, open_weights

QUANTIZED = "transformer_blocks."  # --quantize packs the blocks' linear layers; the small in/out layers stay dense
FUSED_21 = ".img_mlp.gate_up.weight"  # ComfyUI's Qwen-Image-2.1 files: SwiGLU gate and up in one, gate rows first


@dataclass(frozen=True)
class Source:
    file: Path | None = None  # --transformer: one file of transformer weights
    dequantize: bool | None = None  # unpack packed weights once at load; None: on the CPU only
    quantize: str = "none"  # fp8: pack the dense block weights as scaled fp8 at load

    def __post_init__(self):
        if self.quantize not in QUANTIZE:
            raise UsageError(f"--quantize {self.quantize!r} is not one of {', '.join(QUANTIZE)}")
        if self.quantize != "none" and self.file is not None and self.file.suffix.lower() == ".gguf":
            raise UsageError(f"--quantize {self.quantize} packs dense weights; {self.file} is GGUF, already "
                             "quantized: leave --quantize out")
        if self.file is not None and self.file.is_file():
            start_sha256(self.file)  # tens of seconds for a large file: it runs while the job does

    @property
    def plain(self) -> bool:
        """The folder's own dense weights, loaded as they are."""
        return self.file is None and self.quantize == "none"

    def unpacks(self, device: torch.device) -> bool:
        return device.type == "cpu" if self.dequantize is None else self.dequantize

    def fingerprint(self) -> str:
        """What changes the numbers: the file's identity (sampled, as the folder's) and --quantize."""
        parts = [fingerprint(self.file)] if self.file else []
        return "-".join(parts + ([f"quantize-{self.quantize}"] if self.quantize != "none" else []))


def build(cfg: TransformerConfig | Transformer21Config) -> nn.Module:
    """The transformer a config describes: Qwen-Image's MMDiT or Qwen-Image-2.1's single stream."""
    return QwenImage21Transformer(cfg) if isinstance(cfg, Transformer21Config) else QwenImageTransformer(cfg)


def load_transformer(cfg: TransformerConfig | Transformer21Config, folder: Path, source: Source, dtype: torch.dtype,
                     device: torch.device) -> nn.Module:
    """The transformer of `cfg` with its weights from `source`, every key and shape checked."""
    if source.plain:
        return load_module(lambda: build(cfg), folder, dtype, device)
    with torch.device("meta"):
        module = build(cfg)
    expected = module.state_dict()
    unpack = source.unpacks(device)
    with _opened(cfg, folder, source) as found:
        if found.skipped:
            warnings.warn(f"--transformer {found.path} is an all-in-one checkpoint: using its {len(found.weights)} "
                          f"transformer weights (model.diffusion_model.*), ignoring {found.skipped} keys of other "
                          "components", QimgWarning, stacklevel=2)
        check_keys(f"--transformer {source.file}" if source.file else folder, expected,
                   {k: w.shape for k, w in found.weights.items()}, UsageError if source.file else QimgError)
        kinds = {name: _kind(name, w, source.quantize) for name, w in found.weights.items()}
        packed = {name for name, kind in kinds.items() if kind != "dense" and not unpack and _linear(module, name)}
        for name in packed:
            w = found.weights[name]
            _pack_layer(module, name, kinds[name], w.scale is not None or w.kind == "dense", dtype)
        state, contents = {}, Contents(UsageError if source.file else QimgError)
        for name, w in found.weights.items():
            state.update(_tensors(name, w, kinds[name], name in packed, dtype, device, partial(contents.check,
                                  file=f"--transformer {source.file}" if source.file else folder, key=name)))
        contents.all_zero(f"--transformer {source.file}" if source.file else folder)
    module.load_state_dict(state, assign=True)
    return module.eval().requires_grad_(False)


@contextmanager
def _opened(cfg, folder: Path, source: Source):
    """The weights of `source` under the model's own key names."""
    with open_weights(source.file) if source.file else folder_weights(folder) as found:
        yield unfused(found) if isinstance(cfg, Transformer21Config) else found


def unfused(found: Weights) -> Weights:
    """A Qwen-Image-2.1 file's weights with ComfyUI's fused `img_mlp.gate_up` split into diffusers' `gate_layer`
    (the first half of the rows) and `proj` (diffusers' convert_qwen_image21_transformer_checkpoint_to_diffusers).
    Rows split whole in every format: a GGUF row is whole blocks, and an fp8 tensor's one scale serves both."""
    weights = {}
    for name, w in found.weights.items():
        if not name.endswith(FUSED_21):
            weights[name] = w
            continue
        if w.shape[0] % 2:
            raise UsageError(f"--transformer {found.path}: {name} has {w.shape[0]} rows, not gate and up halves")
        shape = (w.shape[0] // 2, *w.shape[1:])
        for half, part in enumerate((".img_mlp.gate_layer.weight", ".img_mlp.proj.weight")):
            weights[name.removesuffix(FUSED_21) + part] = dataclasses.replace(w, shape=shape,
                                                                              read=partial(_rows, w.read, half))
    return dataclasses.replace(found, weights=weights)


def _rows(read, half: int) -> torch.Tensor:
    """Half the rows, copied: a view would keep the whole fused tensor alive as long as the loaded weight."""
    return read().chunk(2, dim=0)[half].clone()


def _kind(name: str, w: Weight, quantize: str) -> str:
    if quantize == "fp8" and w.kind == "dense" and name.startswith(QUANTIZED) and name.endswith(".weight") \
            and len(w.shape) == 2:
        return "F8_E4M3"
    return w.kind


def _linear(module: nn.Module, name: str) -> bool:
    return name.endswith(".weight") and isinstance(module.get_submodule(name.removesuffix(".weight")), nn.Linear)


def _pack_layer(module: nn.Module, name: str, kind: str, scaled: bool, dtype: torch.dtype) -> None:
    """Swap the meta Linear owning weight `name` for a PackedLinear with meta placeholders of the packed shapes."""
    layer = name.removesuffix(".weight")
    linear = module.get_submodule(layer)
    out_features, in_features = linear.weight.shape
    width = in_features if kind in FP8 else in_features // BLOCKS[kind][0] * BLOCKS[kind][1]
    meta = torch.device("meta")
    module.set_submodule(layer, PackedLinear(
        kind, (out_features, in_features), torch.empty(out_features, width, dtype=torch.uint8, device=meta),
        None if linear.bias is None else torch.empty(out_features, dtype=dtype, device=meta),
        torch.empty((), dtype=torch.float32, device=meta) if scaled else None, dtype))


def _tensors(name: str, w: Weight, kind: str, packed: bool, dtype: torch.dtype, device: torch.device,
             check) -> dict:
    """The state dict entries of weight `name`: packed bytes (and scale) for a packed layer, else dense. check:
    Contents.check of the file, on the device (on the CPU for a weight unpacked there first)."""
    if w.kind == "dense":
        dense = check(w.read().to(device))
        if kind == "dense":
            return {name: dense.to(dtype=dtype)}
        data, scale = quantize_fp8(dense)  # --quantize
    else:
        data, scale = check(w.read().to(device) if packed else w.read(), kind=w.kind), w.scale
    if not packed:
        return {name: dequantize(kind, data, w.shape, scale).to(device=device, dtype=dtype)}
    layer = name.removesuffix(".weight")
    return {name: data.to(device), **({} if scale is None else {f"{layer}.scale": scale.to(device)})}


def tensor_sizes(cfg: TransformerConfig | Transformer21Config, folder: Path, source: Source, dtype: torch.dtype,
                 device: torch.device) -> dict[str, int]:
    """Bytes per weight once loaded (packed sizes where they stay packed), from the file's header alone."""
    unpack, dense = source.unpacks(device), dtype.itemsize
    if source.file is None:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build(cfg).state_dict().items()}
        kinds = {k: _kind(k, Weight("dense", s, None), source.quantize) for k, s in shapes.items()}
    else:
        with _opened(cfg, folder, source) as found:
            shapes = {k: w.shape for k, w in found.weights.items()}
            kinds = {k: _kind(k, w, source.quantize) for k, w in found.weights.items()}
    return {k: math.prod(shapes[k]) * dense if kind == "dense" or unpack else packed_size(kind, shapes[k])
            for k, kind in kinds.items()}


def provenance(source: Source) -> dict | None:
    """For the output's metadata: the transformer file's name, sha256 and format, and --quantize; None for the
    folder's own weights."""
    if source.plain:
        return None
    info = {"quantize": source.quantize} if source.quantize != "none" else {}
    if source.file is None:
        return info
    with open_weights(source.file) as found:
        return {"name": source.file.name, "sha256": sha256(source.file), "format": found.format, **info}


_digests: dict[tuple, tuple[threading.Thread, dict]] = {}  # (path, size, mtime) -> the hashing thread, its result


def _identity(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def start_sha256(path: Path) -> None:
    """Hash `path` in a background thread (hashlib releases the GIL), once per file version per process."""
    key = _identity(path)
    if key not in _digests:
        result = {}

        def work():
            try:
                result["hex"] = _hash(path)
            except OSError:  # reported by sha256(), in the caller's thread, as one line
                pass

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        _digests[key] = thread, result


def sha256(path: Path) -> str:
    start_sha256(path)
    thread, result = _digests[_identity(path)]
    thread.join()
    return result["hex"] if "hex" in result else _hash(path)  # a failed read raises here, in the caller


def _hash(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_of(f)
