"""Tiled VAE decoding: a large latent decoded in overlapping tiles, blended where they overlap.

Memory then grows with the tile, not the image. Each tile's weight ramps linearly from ~0 at its inner
edges to 1 at `overlap` from them (image borders keep full weight), and the sum is normalised, so the
seams fade over the overlap. The decoder's mid-block attention sees one tile at a time, which is why the
result differs slightly from one whole decode; it is used only on large images (see engine.latents.TILE_ABOVE).
"""

import torch
from torch import Tensor


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering 0..n, neighbours sharing at least `overlap`."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


def ramp(n: int, fade: int, at_start: bool, at_end: bool) -> Tensor:
    """(n,) weights: 1 in the middle, rising linearly over `fade` from a tile edge that meets a neighbour."""
    w = torch.ones(n)
    edge = (torch.arange(fade) + 0.5) / fade
    if at_start:
        w[:fade] = edge
    if at_end:
        w[n - fade:] = torch.minimum(w[n - fade:], edge.flip(0))
    return w


def tiled_decode(decode, z: Tensor, tile: int, overlap: int, scale: int = 8) -> Tensor:
    """decode: (B, C, h, w) latent -> (B, 3, h*scale, w*scale), run on tiles of `tile` latent pixels."""
    h, w = z.shape[-2:]
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = weight = None
    for y in ys:
        for x in xs:
            part = decode(z[..., y:y + tile, x:x + tile]).float()
            th, tw = part.shape[-2:]
            wy = ramp(th, overlap * scale, y > 0, y + tile < h)
            wx = ramp(tw, overlap * scale, x > 0, x + tile < w)
            mask = (wy[:, None] * wx[None]).to(part.device)
            if out is None:
                out = part.new_zeros(*part.shape[:2], h * scale, w * scale)
                weight = part.new_zeros(h * scale, w * scale)
            out[..., y * scale:y * scale + th, x * scale:x * scale + tw] += part * mask
            weight[y * scale:y * scale + th, x * scale:x * scale + tw] += mask
    return out / weight
