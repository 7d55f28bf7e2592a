"""How much memory a run needs besides the weights, estimated from the image size and the model config, so
an absurd size is refused in milliseconds with a number, before any weights load, instead of ending in an
out-of-memory error (or the kernel's OOM killer) minutes later."""

import os

import torch

from qimg.errors import UsageError
from qimg.model.qwen2 import Qwen2Config
from qimg.model.transformer import TransformerConfig
from qimg.model.vae import VAEConfig
from qimg.model.vision import VisionConfig

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
    tokens = image_tokens((width, height), transformer) + TEXT_TOKENS
    transformer_peak = tokens * transformer.dim * (16 * dtype_bytes + 8)
    vae_peak = (vae_pixels or width * height) * vae.base_dim * (5 * dtype_bytes + 4)
    return max(transformer_peak, vae_peak)


def image_tokens(size: tuple[int, int], transformer: TransformerConfig) -> int:
    """The transformer's tokens for an image of size (W, H)."""
    return (size[0] // (8 * transformer.patch_size)) * (size[1] // (8 * transformer.patch_size))


def edit_activation_bytes(work: tuple[int, int], pictures: list[tuple[int, int]], patches: int,
                          transformer: TransformerConfig, vae: VAEConfig, text: Qwen2Config, vision: VisionConfig,
                          dtype_bytes: int) -> int:
    """Peak working memory of an instruction edit whose noisy image is `work` (W, H), shown `pictures` (each
    (W, H) at the edit area, as the VAE encodes it) and `patches` vision patches (every picture at the vision
    area, as the processor cuts it): the largest of
    - the transformer over the noisy tokens, every picture's latent tokens and the instruction, whose
      embedding holds a token per merged vision patch besides the words;
    - the VAE over the largest of these images;
    - the vision tower over every patch (and its input rows, float32), and the language model over the
      instruction. Both take the transformer's rule per token and model dim (not calibrated apart).
    """
    per_dim = 16 * dtype_bytes + 8
    text_tokens = TEXT_TOKENS + patches // vision.spatial_merge_size ** 2
    tokens = sum(image_tokens(size, transformer) for size in (work, *pictures)) + text_tokens
    row = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    return max(tokens * transformer.dim * per_dim,
               max(w * h for w, h in (work, *pictures)) * vae.base_dim * (5 * dtype_bytes + 4),
               patches * (vision.hidden_size * per_dim + row * 4),
               text_tokens * text.hidden_size * per_dim)


def qwen21_activation_bytes(work: tuple[int, int], pictures: list[tuple[int, int]], dim: int, vae_base_dim: int,
                            dtype_bytes: int) -> int:
    """Peak working memory of a Qwen-Image-2.1 run whose target is `work` (W, H) with `pictures` ((W, H) each at
    their working sizes): the transformer over one token per 16x16 pixels of each (and the prompt, whose picture
    slots are a quarter of the pictures' tokens), or the VAE over the largest image; the rules above per token per
    model dim and per pixel per VAE base channel."""
    tokens = sum((w // 16) * (h // 16) for w, h in (work, *pictures))
    tokens += TEXT_TOKENS + sum((w // 32) * (h // 32) for w, h in pictures)
    return max(tokens * dim * (16 * dtype_bytes + 8),
               max(w * h for w, h in (work, *pictures)) * vae_base_dim * (5 * dtype_bytes + 4))


def device_bytes(device: torch.device) -> int | None:
    """Total memory of the device (physical RAM for the CPU), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return torch.mps.recommended_max_memory()
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def free_bytes(device: torch.device) -> int | None:
    """Memory free on the device now (MemAvailable for the CPU), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return device_bytes(device)


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


def check_weights(weights: int, activations: int, have: int | None, device: str, size: tuple[int, int],
                  text: int = 0) -> None:
    """Refuse a run whose transformer weights (bytes resident on the device), the text encoder's kept beside them
    (`text`: counted for a --text-encoder file without --offload model) and activations exceed the device."""
    if have is None or weights + text + activations <= have:
        return
    fixes = ("--dtype bfloat16, or a quantized --transformer file (GGUF, fp8) with --no-dequantize" if device == "cpu"
             else "--offload blocks, a quantized --transformer file (GGUF, fp8) or --quantize fp8")
    also = f" and the text encoder's {gigabytes(text)}" if text else ""
    raise UsageError(f"the transformer's weights take about {gigabytes(weights)}{also} of {device} memory, "
                     f"{gigabytes(weights + text + activations)} with the activations at {size[0]}x{size[1]}, and the "
                     f"device has {gigabytes(have)}; use {fixes}{', or --offload model' if text else ''}")
