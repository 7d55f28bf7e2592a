"""Qwen2.5-VL's vision tower: what the edit models run on their pictures before the language model reads them.

A native replacement for transformers' Qwen2_5_VisionTransformerPretrainedModel, for still images. Patch rows
(3 channels x 2 frames x 14 x 14, from vl_image.py) arrive in 2x2 merge-block-major order; they are embedded by
a 3D convolution, regrouped so each 112-pixel window is contiguous, run through blocks that attend within
their window (or over the whole image, in the config's full-attention blocks) with a 2D rotary embedding, and
merged 2x2 into tokens of the language model's width, in the original order. Module names are the checkpoint
keys after `remap_keys`.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.model.qwen2 import RMSNorm

EPS = 1e-6  # every RMSNorm of the tower (transformers hard-codes it)


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584  # the language model's width
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2  # 2x2 patches become one language-model token
    temporal_patch_size: int = 2  # a still image is its own frame pair
    window_size: int = 112  # pixels: 4x4 merged tokens attend together outside the full-attention blocks
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window(self) -> int:
        """A window's side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        """From text_encoder/config.json's `vision_config` (older saves name in_channels `in_chans`)."""
        v = d.get("vision_config")
        if not isinstance(v, dict):
            raise ValueError("it has no vision_config: this text encoder has no vision tower")
        v = {"in_channels": v.get("in_chans", 3)} | v
        kw = {f.name: v[f.name] for f in dataclasses.fields(cls) if f.name in v}
        kw["fullatt_block_indexes"] = tuple(kw.get("fullatt_block_indexes", cls.fullatt_block_indexes))
        rope = v.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if v.get("hidden_act", "silu") != "silu":
            raise ValueError(f"vision_config hidden_act={v['hidden_act']!r} is not supported (Qwen2.5-VL uses silu)")
        return cls(**kw)

    @classmethod
    def tiny(cls) -> "VisionConfig":
        return cls(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=(1,))


def remap_keys(key: str) -> str | None:
    """Checkpoint key -> our key, or None to skip it unread."""
    for prefix in ("model.visual.", "visual."):  # transformers >= 5's own layout; older saves (Qwen/Qwen-Image)
        if key.startswith(prefix):
            return key[len(prefix):]
    return None  # the language model and lm_head


# --- math -------------------------------------------------------------------------------------------


def patch_positions(grids: list[tuple[int, int]], merge: int) -> Tensor:
    """(N, 2) row and column of every patch, in the processor's merge-block-major order."""
    out = []
    for h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        out.append(torch.stack([rows.reshape(blocks).transpose(1, 2).flatten(),
                                cols.reshape(blocks).transpose(1, 2).flatten()], dim=-1))
    return torch.cat(out)


def window_order(grids: list[tuple[int, int]], merge: int, window: int) -> tuple[Tensor, list[int]]:
    """The merged tokens regrouped window by window (windows row-major, tokens row-major inside; edge windows
    smaller), and each window's length in merged tokens (the reference's get_vision_window_index)."""
    order, lengths, start = [], [], 0
    for h, w in grids:
        lh, lw = h // merge, w // merge
        index = torch.arange(lh * lw).reshape(lh, lw) + start
        for r in range(0, lh, window):
            for c in range(0, lw, window):
                block = index[r:r + window, c:c + window].flatten()
                order.append(block)
                lengths.append(block.numel())
        start += lh * lw
    return torch.cat(order), lengths


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin (N, head_dim) in float32: the first half of the rotary frequencies turn with the row, the
    second with the column, halves duplicated for `rotate_half` (the reference's axial rope)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
    angles = (positions[..., None].float() * inv_freq).flatten(1)  # (N, 2 * half/2): rows then columns
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """(N, H, D) rotated in float32 by (N, D) tables, back in x's dtype."""
    h = x.float()
    h1, h2 = h.chunk(2, dim=-1)
    return (h * cos[:, None] + torch.cat([-h2, h1], dim=-1) * sin[:, None]).to(x.dtype)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, lengths: list[int]) -> Tensor:
    """(N, H, D) attention within consecutive segments of `lengths`, batched: segments padded to the longest,
    padded keys masked out."""
    n, longest = len(lengths), max(lengths)
    if all(length == longest for length in lengths):
        def batch(t):  # (N, H, D) -> (S, H, L, D)
            return t.view(n, longest, *t.shape[1:]).transpose(1, 2)

        return F.scaled_dot_product_attention(batch(q), batch(k), batch(v)).transpose(1, 2).reshape(q.shape)

    def batch(t):
        return nn.utils.rnn.pad_sequence(t.split(lengths), batch_first=True).transpose(1, 2)

    real = torch.arange(longest, device=q.device) < torch.tensor(lengths, device=q.device)[:, None]  # (S, L)
    out = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), attn_mask=real[:, None, None, :])
    return out.transpose(1, 2)[real]


# --- modules ----------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig, bias: bool = False):
        """cfg: this tower's config or Qwen3-VL's (model/qwen3vl_vision.py, whose convolution has a bias)."""
        super().__init__()
        self.kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=self.kernel, stride=self.kernel, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C*T*P*P) patch rows -> (N, hidden)."""
        return self.proj(x.view(-1, self.proj.in_channels, *self.kernel).to(self.proj.weight.dtype)).flatten(1)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        """cfg: this tower's config or Qwen3-VL's (model/qwen3vl_vision.py)."""
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], lengths: list[int]) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(1)  # each (N, H, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.proj(segment_attention(q, k, v, lengths).flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, EPS)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, EPS)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], lengths: list[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.out_hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        """(N, hidden) patches, each 2x2 block consecutive -> (N/4, out_hidden) tokens."""
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.merger = Merger(cfg)

    def forward(self, pixel_values: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        """(N, C*T*P*P) patch rows of every image, each image's (rows, cols) in patches -> (N/4, out_hidden)
        tokens, image after image, each in the order of its <|image_pad|> tokens."""
        cfg, unit = self.cfg, self.cfg.spatial_merge_size ** 2
        order, windows = window_order(grids, cfg.spatial_merge_size, cfg.window)
        device = pixel_values.device
        order = order.to(device)

        def by_window(t):  # regroup patch rows so each window's merge blocks are contiguous
            return t.view(-1, unit, *t.shape[1:])[order].flatten(0, 1)

        x = by_window(self.patch_embed(pixel_values))
        cos, sin = rope_tables(patch_positions(grids, cfg.spatial_merge_size).to(device), cfg.head_dim, cfg.rope_theta)
        rope = (by_window(cos), by_window(sin))
        images = [h * w for h, w in grids]
        windows = [n * unit for n in windows]
        for i, block in enumerate(self.blocks):
            x = block(x, rope, images if i in cfg.fullatt_block_indexes else windows)
        return self.merger(x)[torch.argsort(order)]
