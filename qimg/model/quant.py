"""Packed transformer weights: GGUF blocks and scaled fp8, unpacked with torch.

Every unpack function takes a layer's packed bytes, (rows, bytes per row) uint8, and returns float32 (rows,
columns). They are ports of ggml's reference dequantization (the `gguf` package's numpy code) and compute in
float32 with the same operations in the same order, so they match it to the last bit or within rounding.
A `PackedLinear` keeps its weight packed and unpacks it on every forward into the compute dtype; LoRAs on it
run as side branches in that dtype, never rounded back into the blocks.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QK_K = 256  # values in one K-quant super-block
BLOCKS = {  # ggml block type: (values per block, bytes per block)
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210),
}
FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # W = fp8 * scale, one scale per tensor
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def packed_size(kind: str, shape: tuple[int, ...]) -> int:
    """Bytes a weight of `shape` takes packed as `kind` (a block type or an fp8 format)."""
    numel = 1
    for n in shape:
        numel *= n
    if kind in FP8:
        return numel
    size, nbytes = BLOCKS[kind]
    return numel // size * nbytes


# --- unpacking ----------------------------------------------------------------------------------------------


def _shifts(*values: int, device) -> Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _f16(b: Tensor) -> Tensor:
    """(n, 2) bytes of one fp16 scale per block -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(n, m) bytes -> (n, 2m): the low nibbles, then the high ones (ggml's order within a block)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: Tensor, width: int) -> Tensor:
    """(n, 4) bytes, one bit per value (little-endian) -> (n, width) of 0/1."""
    bits = qh.contiguous().view(torch.int32) >> torch.arange(width, dtype=torch.int32, device=qh.device)
    return (bits & 1).to(torch.uint8)


def q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def q4_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def q4_1(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def q5_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6], 32) << 4)
    return _f16(b[:, :2]) * (q.to(torch.int8) - 16).float()


def q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8], 32) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 1, 4, 1)) & 3
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, QK_K)


def q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 six-bit scales: low four bits in bytes 0-7 (two per byte), high two bits in bytes 8-11 (four per byte)
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 4, device=b.device).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 4, 1)).reshape(n, 16)
    sc = (((low & 0x0F) | ((high & 3) << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1))
    qh = (qh.reshape(n, 16, 16) & 1) ^ 1  # ggml subtracts 4 where the mask bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block, float32 (n, 8, 1) each."""
    n = scales.shape[0]
    d, m, md = scales.reshape(n, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float().reshape(n, 8, 1), mn.float().reshape(n, 8, 1)


def q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d, dm = _f16(b[:, :2]).reshape(n, 1, 1) * sc, _f16(b[:, 2:4]).reshape(n, 1, 1) * mn
    q = (b[:, 16:].reshape(n, 4, 1, 32) >> _shifts(0, 4, device=b.device).reshape(1, 1, 2, 1)) & 0x0F
    return (d * q.reshape(n, 8, 32).float() - dm).reshape(n, QK_K)


def q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d, dm = _f16(b[:, :2]).reshape(n, 1, 1) * sc, _f16(b[:, 2:4]).reshape(n, 1, 1) * mn
    ql = (b[:, 48:].reshape(n, 4, 1, 32) >> _shifts(0, 4, device=b.device).reshape(1, 1, 2, 1)) & 0x0F
    bits = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1)
    qh = (b[:, 16:48].reshape(n, 1, 1, 32) >> bits) & 1
    q = ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)
    return (d * q.float() - dm).reshape(n, QK_K)


def q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = (ql.reshape(n, 2, 1, 64) >> _shifts(0, 4, device=b.device).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 1, 4, 1)) & 3
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


SCALE_BYTES = {  # where each block keeps its fp16 scales (d, and dmin where there is one)
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
FP8_NONFINITE = {"F8_E4M3": 0x7F, "F8_E5M2": 0x7C}  # the bits (sign aside) that are all set in NaN (and inf) codes


def finite(kind: str, packed: Tensor) -> bool:
    """Whether a packed weight unpacks to finite values, from its bytes alone: fp8 holds no NaN or infinity
    code; every GGUF block's fp16 scales are finite (the values are small integers times them)."""
    if kind in FP8:  # (byte & bits) is at most bits, and equals it only in a NaN or infinity code
        bits = FP8_NONFINITE[kind]
        return not packed.numel() or int((packed & bits).amax()) != bits
    blocks = packed.reshape(-1, BLOCKS[kind][1])
    return all(bool(_f16(blocks[:, at:at + 2]).isfinite().all()) for at in SCALE_BYTES[kind])


UNPACK = {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1,
          "Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


def dequantize(kind: str, packed: Tensor, shape: tuple[int, ...], scale: Tensor | None = None) -> Tensor:
    """A packed weight as float32 of `shape`. packed: uint8 (fp8 bytes, or whole blocks); scale: fp8's."""
    if kind in FP8:
        w = packed.view(FP8[kind]).float()
        return w if scale is None else w * scale
    _, nbytes = BLOCKS[kind]
    return UNPACK[kind](packed.reshape(-1, nbytes)).reshape(shape)


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(fp8 e4m3 bytes, float32 scalar scale) with w ~= fp8 * scale: one scale per tensor, the largest |w|
    landing on fp8's largest value (ComfyUI's scaled fp8)."""
    w = w.float()
    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8), scale


# --- the layer ----------------------------------------------------------------------------------------------


class PackedLinear(nn.Module):
    """A Linear whose weight stays packed (`weight`: uint8 bytes, plus `scale` for fp8) and is unpacked on each
    forward into the input's dtype. Side branches (LoRAs) add to its output, computed in `dtype`.

    Everything lives in buffers, so the module's state dict is what `offload.py` streams."""

    def __init__(self, kind: str, shape: tuple[int, int], weight: Tensor, bias: Tensor | None,
                 scale: Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.kind, self.shape, self.dtype = kind, tuple(shape), dtype
        self.out_features, self.in_features = self.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.branches = 0

    def unpacked(self) -> Tensor:
        """The weight as float32 (out, in)."""
        return dequantize(self.kind, self.weight, self.shape, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.unpacked().to(x.dtype), self.bias)
        for i in range(self.branches):
            down, up = getattr(self, f"branch{i}_down"), getattr(self, f"branch{i}_up")
            y = y + (F.linear(x, down) if up is None else F.linear(F.linear(x, down), up))
        return y

    def add_branch(self, down: Tensor, up: Tensor | None) -> None:
        """Add y += (x @ down.T) @ up.T (a LoRA, its scale folded into up), or y += x @ down.T when up is None
        (down: a dense delta (out, in)), kept apart from the packed weight, in the compute dtype."""
        fits = (tuple(down.shape) == self.shape if up is None else
                down.shape[1] == self.in_features and tuple(up.shape) == (self.out_features, down.shape[0]))
        if down.ndim != 2 or not fits:
            raise ValueError(f"branch of shapes {tuple(down.shape)}, {None if up is None else tuple(up.shape)} "
                             f"does not fit a layer of shape {self.shape}")
        i = self.branches
        self.register_buffer(f"branch{i}_down", down.to(self.weight.device, self.dtype))
        self.register_buffer(f"branch{i}_up", None if up is None else up.to(self.weight.device, self.dtype))
        self.branches += 1

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"
