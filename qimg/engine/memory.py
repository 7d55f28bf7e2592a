"""How much memory a run needs besides the weights, estimated from the image size and the model config, so
an absurd size is refused in milliseconds with a number, before any weights load, instead of ending in an
out-of-memory error (or the kernel's OOM killer) minutes later."""

import os

import torch

from qimg.errors import UsageError
from qimg.model.transformer import TransformerConfig
from qimg.model.vae import VAEConfig

TEXT_TOKENS = 512  # the most prompt tokens the transformer sees (model/text.py MAX_EMBED)


def activation_bytes(width: int, height: int, transformer: TransformerConfig, vae: VAEConfig, dtype_bytes: int,
                     vae_pixels: int | None = None) -> int:
    """Peak working memory of one transformer forward or one VAE pass at width x height, whichever is larger.
    vae_pixels: the most pixels one VAE pass sees, when fewer than width x height (a tiled decode).

    Calibrated on CPU in float32 (peak RSS of one real-width block at 1024-2048 px, and of the VAE at
    512-1024 px): about 70 bytes per token per model dim, 24 bytes per pixel per VAE base channel. Both
    scale linearly because attention runs memory-efficient kernels (no (N, N) score matrix); float32
    temporaries of RoPE and the norms do not shrink with the dtype, hence the constant terms.
    """
    tokens = (width // (8 * transformer.patch_size)) * (height // (8 * transformer.patch_size)) + TEXT_TOKENS
    transformer_peak = tokens * transformer.dim * (16 * dtype_bytes + 8)
    vae_peak = (vae_pixels or width * height) * vae.base_dim * (5 * dtype_bytes + 4)
    return max(transformer_peak, vae_peak)


def device_bytes(device: torch.device) -> int | None:
    """Total memory of the device (physical RAM for the CPU), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return torch.mps.recommended_max_memory()
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def gigabytes(n: float) -> str:
    return f"{n / 2**30:,.1f} GB" if n < 2**40 * 10 else f"{n / 2**40:,.0f} TB"


def resident_bytes(sizes: dict[str, int], streamed: bool) -> int:
    """Bytes of the transformer's weights (sizes: bytes per tensor name, packed where they stay packed) held on
    the device at once: all of them, or with streamed blocks (--offload blocks) everything else plus two blocks,
    the one running and the next being copied."""
    if not streamed:
        return sum(sizes.values())
    blocks, rest = {}, 0
    for name, n in sizes.items():
        if name.startswith("transformer_blocks."):
            index = name.split(".")[1]
            blocks[index] = blocks.get(index, 0) + n
        else:
            rest += n
    return rest + sum(sorted(blocks.values())[-2:])


def check_weights(weights: int, activations: int, have: int | None, device: str, size: tuple[int, int]) -> None:
    """Refuse a run whose transformer weights (bytes resident on the device) and activations exceed the device."""
    if have is None or weights + activations <= have:
        return
    fixes = ("--dtype bfloat16, or a quantized --transformer file (GGUF, fp8) with --no-dequantize" if device == "cpu"
             else "--offload blocks, a quantized --transformer file (GGUF, fp8) or --quantize fp8")
    raise UsageError(f"the transformer's weights take about {gigabytes(weights)} of {device} memory, "
                     f"{gigabytes(weights + activations)} with the activations at {size[0]}x{size[1]}, and the device "
                     f"has {gigabytes(have)}; use {fixes}")
