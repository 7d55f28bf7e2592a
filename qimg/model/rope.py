"""Qwen-Image's multimodal scalable RoPE (MSRoPE) as real-valued cos/sin math.

Every token of the joint [text; image] sequence gets a 3-axis position (frame, row, col). Each axis
rotates its own slice of the head dim (`axes_dims`, e.g. 16/56/56 of 128). Image positions are centred
on the grid; text tokens sit on the diagonal (p, p, p) just past the image's largest positive index.
Several grids (an edit's noisy image, then its reference images) each take their own frame index and are
each centred; text starts past the largest of them.
Numbers match diffusers' QwenEmbedRope(scale_rope=True) + apply_rotary_emb_qwen(use_real=False).
"""

from functools import lru_cache

import torch
from torch import Tensor


def image_positions(h: int, w: int, frame: int = 0) -> Tensor:
    """(h*w, 3) integer (frame, row, col) positions of a row-major h x w patch grid."""
    # Centred like the reference's scale_rope: rows run -(h - h//2) .. h//2 - 1, so an odd side
    # has one more negative index than positive. Grid i of a list is frame i (the reference's idx).
    rows = torch.arange(h) - (h - h // 2)
    cols = torch.arange(w) - (w - w // 2)
    r, c = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
    return torch.stack([torch.full_like(r, frame), r, c], dim=-1).reshape(h * w, 3)


def text_positions(s: int, grids: tuple[tuple[int, int], ...]) -> Tensor:
    """(s, 3) positions of s text tokens placed after the image grids (h, w)."""
    # The reference starts text at the largest max(h//2, w//2): the first index no image row/col reaches.
    # All three axes share the index, frame axis included. Padding does not shift it.
    start = max(max(h // 2, w // 2) for h, w in grids)
    return torch.arange(start, start + s)[:, None].expand(s, 3)


def rope_angles(pos: Tensor, axes_dims: tuple[int, ...], theta: float = 10000.0) -> Tensor:
    """(N, 3) positions -> (N, sum(axes_dims)/2) float32 rotation angles, axis slices concatenated."""
    angles = []
    for i, dim in enumerate(axes_dims):
        # Same float32 expression as the reference's rope_params, so the tables agree to the ulp.
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32).div(dim))
        angles.append(pos[:, i, None].float() * inv_freq)  # (N, dim/2)
    return torch.cat(angles, dim=-1)


@lru_cache(maxsize=16)
def joint_rope(grids: tuple[tuple[int, int], ...], s: int, axes_dims: tuple[int, ...],
               theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin tables (s + sum of h*w, head_dim/2) for the joint [text; image 0; image 1; ...] sequence,
    float32 on CPU. grids: (h, w) per image, the noisy one first.

    Built on CPU like the reference's precomputed table; cached per (grids, text length) because the
    sampler calls the model many times with the same shapes. Callers move them to the device.
    """
    images = [image_positions(h, w, i) for i, (h, w) in enumerate(grids)]
    pos = torch.cat([text_positions(s, grids), *images])  # (s + sum h*w, 3)
    angles = rope_angles(pos, axes_dims, theta)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, N, H, D) queries/keys by float32 (N, D/2) tables; returns x's dtype."""
    # Rotated pairs are adjacent channels (x0, x1), (x2, x3), ...: the reference's view_as_complex
    # layout. The rotation runs in float32 even for bf16 x, as in the reference.
    x_re, x_im = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, H, D/2) each
    cos, sin = cos[:, None], sin[:, None]  # (N, 1, D/2): broadcast over heads
    out = torch.stack([x_re * cos - x_im * sin, x_re * sin + x_im * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
