"""Qwen-Image-2.1's transformer: a native reimplementation of diffusers' QwenImage21Transformer2DModel.

One stream of blocks over the joint sequence [text + condition pictures | target] (rope21.Layout). Every block
shares one modulation (scale and gate, no shift) computed once per call; with `causal_condition` the prefix
(text and condition pictures) is modulated at t = 0 and only the target at t, so the prefix's keys and values
do not change between steps: a PrefixCache keeps them from the first call and later calls run the target's
tokens alone (the reference's kv_cache_mode "extract" then "cached"; in float32 the numbers are the same).
Module names are the reference's checkpoint keys: a diffusers state dict loads with `strict=True`.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.model.rope import apply_rope
from qimg.model.rope21 import Layout
from qimg.model.transformer import RMSNorm, TimestepEmbedder, attention, tokenwise


@dataclass(frozen=True)
class Transformer21Config:
    patch_size: int = 1  # 2.1 reads latents unpatched: one token per latent pixel
    in_channels: int = 64
    out_channels: int = 64
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096  # Qwen3-VL-8B hidden size
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # (frame, row, col) slices of the head dim
    eps: float = 1e-6
    causal_condition: bool = True  # prefix modulated at t = 0: what makes the prefix cache valid

    def __post_init__(self):
        if self.patch_size != 1:
            raise ValueError(f"transformer config: patch_size {self.patch_size} is not supported (Qwen-Image-2.1 "
                             "has 1)")
        if not isinstance(self.causal_condition, bool):
            raise ValueError("transformer config: causal_condition must be true or false, not "
                             f"{str(self.causal_condition)[:40]!r}")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                             f"{self.attention_head_dim}")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "Transformer21Config":
        """From diffusers' transformer/config.json; raises ValueError naming any key we can't honour."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ValueError(f"transformer config: unknown key {unknown[0]!r}")
        if kw.get("out_channels", 0) is None:  # the reference's `out_channels or in_channels`
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        if "axes_dims_rope" in kw:
            kw["axes_dims_rope"] = tuple(kw["axes_dims_rope"])
        return cls(**kw)

    @classmethod
    def tiny(cls) -> "Transformer21Config":
        return cls(in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                   context_in_dim=24, axes_dims_rope=(4, 6, 6))


# --- math -------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """(B,) t in [0, 1] -> (B, dim) float32 [cos | sin] of (1000 t) * freqs: QwenImage21TemporalTimesteps, whose
    product order differs from the 20B model's by a rounding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000 * t.float())[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def zero_centered_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # The checkpoint stores scale - 1; all in float32, then back to x's dtype.
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + 1)
    return y.to(x.dtype)


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, layout: Layout) -> Tensor:
    """(B, N, H, D) each -> (B, N, H*D). Each prefix run sees the keys [0, end) (a text run causally within
    itself); the target sees every key. One SDPA call per run, as the reference's SDPA processor: exact, no
    N x N mask."""
    valid = layout.key_valid
    out = []
    for start, end, is_text in layout.segments:
        mask = None
        if is_text:  # row i sees keys <= start + i
            mask = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(start)[None, None]
        if valid is not None:
            mask = valid[:, None, None, :end] if mask is None else mask & valid[:, None, None, :end]
        out.append(attention(q[:, start:end], k[:, :end], v[:, :end], mask))
    out.append(attention(q[:, layout.prefix:], k, v, None if valid is None else valid[:, None, None, :]))
    return torch.cat(out, dim=1)


def scale(x: Tensor, s: Tensor) -> Tensor:
    return x * (1 + s)


def gated(x: Tensor, gate: Tensor) -> Tensor:
    return gate.tanh() * x


# --- modules ----------------------------------------------------------------------------------------


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.text_norm = nn.ParameterDict({"weight": nn.Parameter(torch.zeros(in_dim))})
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = zero_centered_rms_norm(x, self.text_norm["weight"], self.eps)
        return self.out_layer(F.gelu(self.in_layer(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=False)
        self.gate_layer = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.silu(self.gate_layer(x)) * self.proj(x))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.head_dim = dim // num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(dim // num_heads, eps), RMSNorm(dim // num_heads, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # key to_out.0; the reference's .1 is dropout

    def forward(self, x: Tensor, layout: Layout, past: tuple[Tensor, Tensor] | None):
        """x: (B, N, dim), every token (past None) or the target's alone after the prefix's cached (B, P, H, D)
        keys and values. Returns the output and the keys and values of x's tokens. Under --ulysses x is this
        rank's shard of the tokens: the layout's exchange gives every token for this rank's heads before rope (the
        keys and values returned, the cache's, are those) and the output's tokens back after attention."""
        q, k, v = (proj(x).unflatten(-1, (-1, self.head_dim)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q).to(v.dtype), self.norm_k(k).to(v.dtype)
        if layout.exchange is not None:
            q, k, v = layout.exchange.to_heads(q, k, v)
        first = 0 if past is None else layout.prefix
        q, k = (apply_rope(y, layout.cos[first:], layout.sin[first:]) for y in (q, k))
        if past is None:
            out = block_causal_attention(q, k, v, layout)
        else:
            valid = layout.key_valid
            out = attention(q, torch.cat([past[0], k], 1), torch.cat([past[1], v], 1),
                            None if valid is None else valid[:, None, None, :])
        if layout.exchange is not None:
            out = layout.exchange.to_tokens(out)
        return self.to_out[0](out), k, v


class QwenImage21Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Attention(dim, num_heads, eps)
        self.img_mlp = SwiGLU(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, mod: Tensor, split: int | None, layout: Layout,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """mod: (B, K, 4*dim) [scale1, gate1, scale2, gate2], K rows applied by tokenwise at `split`."""
        scale1, gate1, scale2, gate2 = mod.chunk(4, dim=-1)

        # attention
        norm = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        attn, k, v = self.attn(tokenwise(scale, norm, scale1, split=split), layout, past)
        x = x + tokenwise(gated, attn, gate1, split=split)

        # MLP
        norm = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        x = x + tokenwise(gated, self.img_mlp(tokenwise(scale, norm, scale2, split=split)), gate2, split=split)

        if x.dtype == torch.float16:  # the reference clips so fp16 residuals stay finite
            x = x.clip(-65504, 65504)
        return x, k, v


class PrefixCache:
    """The prefix's keys and values for every block, after rope: filled by the first forward that is given
    the cache, read by the later ones. One per image and guidance branch (the prompts differ)."""

    def __init__(self):
        self.layers: list[tuple[Tensor, Tensor]] = []
        self.prefix = 0

    @property
    def filled(self) -> bool:
        return bool(self.layers)


class QwenImage21Transformer(nn.Module):
    # The blocks as run_blocks runs them: None for transformer_blocks; with --offload blocks an offload.BlockStream,
    # each block's weights copied to the device just before its turn (offload.place_for_streaming sets it).
    stream = None

    def __init__(self, cfg: Transformer21Config):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.time_text_embed = nn.ModuleDict({"timestep_embedder": TimestepEmbedder(256, dim, bias=False)})
        self.txt_in = TextProjection(cfg.context_in_dim, dim, cfg.eps)
        self.img_in = nn.Linear(cfg.in_channels, dim, bias=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim, bias=False))  # shared by every block
        self.transformer_blocks = nn.ModuleList(
            QwenImage21Block(dim, cfg.num_attention_heads, cfg.mlp_ratio, cfg.eps) for _ in range(cfg.num_layers)
        )
        self.norm_out = nn.ModuleDict({"linear": nn.Linear(dim, dim, bias=False)})  # scale only, no shift
        self.proj_out = nn.Linear(dim, cfg.out_channels, bias=False)

    def forward(self, latents: Tensor, txt: Tensor, t: Tensor, layout: Layout,
                cache: PrefixCache | None = None) -> Tensor:
        """Velocity (B, h*w, out_channels) of the target's tokens.

        latents: (B, L, in_channels) packed latents (patchify(x, 1)), the condition pictures' in prompt order
        then the target's; txt: (B, S, context_in_dim) the text encoder's hidden states, picture slots included
        (they are replaced by latents); t: (B,) in [0, 1] (the reference pipeline's timestep / 1000); layout:
        rope21.build_layout of this request. cache: None runs every token; an empty PrefixCache is filled with
        the prefix's keys and values; a filled one is read and only the target's tokens run (txt and the
        condition latents are then not read).
        """
        cfg, b = self.cfg, latents.shape[0]
        target = layout.length - layout.prefix
        if cache is not None and not cfg.causal_condition:
            raise ValueError("a prefix cache needs causal_condition: without it the prefix changes every step")
        cached = cache is not None and cache.filled
        if cached and cache.prefix != layout.prefix:
            raise ValueError(f"the prefix cache holds {cache.prefix} tokens but this layout's prefix has "
                             f"{layout.prefix}: one cache per image and prompt")
        need = target if cached else int(layout.image.sum())
        if latents.shape[1] < need or not cached and latents.shape[1] != need:
            raise ValueError(f"latents have {latents.shape[1]} tokens but the layout's pictures need {need}")

        if cached:
            x = self.img_in(latents[:, -target:])
        else:
            if txt.shape[1] != layout.text_slots.shape[0]:
                raise ValueError(f"txt has {txt.shape[1]} tokens but the layout's img_mask "
                                 f"{layout.text_slots.shape[0]}")
            img, txt = self.img_in(latents), self.txt_in(txt)
            x = img.new_empty(b, layout.length, img.shape[-1])
            x[:, ~layout.image] = txt[:, layout.text_slots]
            x[:, layout.image] = img

        # One modulation row per sample at t, and with causal_condition one more at t = 0 for the prefix.
        t = t.to(x.device, x.dtype)  # the reference rounds t to the model dtype before embedding it
        rows = torch.cat([t, t.new_zeros(1)]) if cfg.causal_condition else t
        vec = self.time_text_embed["timestep_embedder"](timestep_embedding(rows).to(x.dtype))  # (B[+1], dim)
        mod = self.modulation(vec)[:, None]  # (B[+1], 1, 4*dim)
        if cfg.causal_condition and not cached:  # (B, 2, 4*dim): row 0 for the prefix, row 1 for the target
            mod, split = torch.cat([mod[-1:].expand(b, -1, -1), mod[:b]], dim=1), layout.prefix
        else:
            mod, split = mod[:b], None

        x, prefix = self.run_blocks(x, mod, split, layout, cache.layers if cached else None, cache is not None)
        if cache is not None and not cached:
            cache.layers, cache.prefix = prefix, layout.prefix

        x = x[:, -target:]
        s = self.norm_out["linear"](F.silu(vec[:b]).to(x.dtype))[:, None]
        return self.proj_out(scale(F.layer_norm(x, x.shape[-1:], eps=cfg.eps), s))

    def run_blocks(self, x: Tensor, mod: Tensor, split: int | None, layout: Layout,
                   past: list[tuple[Tensor, Tensor]] | None, extract: bool):
        """The block stack. past: the cached prefix's keys and values per block, or None when every token runs;
        extract: then also return the prefix's (copies, so each block's full-length keys are freed after it)."""
        blocks = self.transformer_blocks if self.stream is None else self.stream
        return run_range(blocks, 0, x, mod, split, layout, past, extract)

    def compile_blocks(self) -> None:
        """torch.compile each block, not the whole model: one graph reused by every block."""
        for block in self.transformer_blocks:
            block.compile()


def run_range(blocks, first: int, x: Tensor, mod: Tensor, split: int | None, layout: Layout,
              past: list[tuple[Tensor, Tensor]] | None, extract: bool):
    """`blocks` (the stack's from index `first` on) in order, as run_blocks: the prefix's keys and values each
    block makes are where the block is."""
    prefix = []
    for i, block in enumerate(blocks, first):
        x, k, v = block(x, mod, split, layout, None if past is None else past[i])
        if past is None and extract:
            prefix.append((k[:, :layout.prefix].clone(), v[:, :layout.prefix].clone()))
    return x, prefix
