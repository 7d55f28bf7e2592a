"""Quantized test files written with the `gguf` package (the test oracle and writer; qimg never imports it).

gguf can quantize F32, F16, BF16, Q8_0 and Q4_0-Q5_1 but not the K-quants, so K-quant blocks are random bytes
with small finite fp16 scales written into their scale fields (random bytes there would be inf/NaN); the true
weight is then whatever `gguf.quants.dequantize` says those blocks hold.
"""

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

# Byte offsets of the fp16 scale fields (d, dmin) in one K-quant block, from ggml's block layouts.
SCALE_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
TARGET_STD = 0.05  # synthetic K-quant weights get about this spread, like a trained layer's


def pack(w: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """w (rows, cols) float32 as GGUF data of type `kind` (K-quants: random blocks of about w's shape)."""
    qtype = GGMLQuantizationType[kind]
    if kind not in SCALE_FIELDS:
        return quantize(w.astype(np.float32), qtype)
    from gguf.constants import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(w.size // block, nbytes), dtype=np.uint8)

    def set_scale(value: float):
        for at in SCALE_FIELDS[kind]:
            blocks[:, at:at + 2] = np.full(len(blocks), value, np.float16).view(np.uint8).reshape(-1, 2)

    set_scale(1e-3)
    spread = dequantize(blocks, qtype).std()
    set_scale(1e-3 * TARGET_STD / spread)
    return blocks.reshape(w.shape[0], -1)


def write_gguf(path: Path, state: dict[str, torch.Tensor], kinds: dict[str, str], arch: str = "qwen_image",
               seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    """Write `state` with each tensor as kinds[name] (default F32); returns the float32 weights the file holds,
    by gguf's own dequantization."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch=arch)
    writer.add_quantization_version(2)
    held = {}
    for name, t in state.items():
        kind = kinds.get(name, "F32")
        w = t.float().numpy()
        data = pack(w.reshape(w.shape[0], -1) if w.ndim > 1 else w[None], kind, rng)
        if w.ndim == 1:
            data = data[0]
        writer.add_tensor(prefix + name, data, raw_dtype=GGMLQuantizationType[kind])
        held[name] = torch.from_numpy(np.array(dequantize(data, GGMLQuantizationType[kind]), np.float32))
        held[name] = held[name].reshape(t.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def raw_gguf(path: Path, arch="qwen_image", kind="Q8_0") -> Path:
    """One 256-wide tensor of type `kind` with random bytes (any type, even those gguf cannot quantize)."""
    from gguf.constants import GGML_QUANT_SIZES

    qtype = GGMLQuantizationType[kind]
    block, nbytes = GGML_QUANT_SIZES[qtype]
    writer = GGUFWriter(str(path), arch=arch)
    data = np.random.default_rng(0).integers(0, 256, (4, 256 // block * nbytes), dtype=np.uint8)
    if kind == "Q8_0":
        data[:, ::nbytes] = 0  # finite scales
    writer.add_tensor("transformer_blocks.0.attn.to_q.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
