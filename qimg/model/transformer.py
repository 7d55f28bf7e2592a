"""Qwen-Image MMDiT: a native reimplementation of diffusers' QwenImageTransformer2DModel.

Sixty double-stream blocks: image and text tokens keep separate weights (modulation, QKV, MLP) and
meet in one joint attention over [text; image]. Module names are the reference's checkpoint keys,
so a diffusers state dict loads with `strict=True` and no renaming.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.model.rope import apply_rope, joint_rope

# Flags of diffusers' class for other Qwen-Image variants (guidance distillation, Layered's extra t-cond and
# 3D rope). The base and Edit models set none; we refuse them rather than ignore them.
_UNSUPPORTED_FLAGS = ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope")
# Present in Qwen/Qwen-Image's transformer/config.json (a Flux leftover); diffusers drops it unused.
_IGNORED_KEYS = ("pooled_projection_dim",)


@dataclass(frozen=True)
class TransformerConfig:
    patch_size: int = 2
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 16  # latent channels; proj_out emits patch*patch*out_channels per token
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # (frame, row, col) slices of the head dim
    zero_cond_t: bool = False  # Edit-2511: reference image tokens are modulated at t = 0, the noisy ones at t

    def __post_init__(self):
        if not isinstance(self.zero_cond_t, bool):
            raise ValueError("transformer config: zero_cond_t must be true or false, not "
                             f"{str(self.zero_cond_t)[:40]!r}")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """From diffusers' transformer/config.json; raises ValueError naming any key we can't honour."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _UNSUPPORTED_FLAGS:
                if value:
                    raise ValueError(f"transformer config: {key}={value!r} is not supported (a Qwen-Image-Layered "
                                     "or guidance-distilled model; Qwen-Image and its Edit models have it off)")
                continue
            if key not in fields:
                raise ValueError(f"transformer config: unknown key {key!r}")
            kw[key] = value
        if "out_channels" in kw and kw["out_channels"] is None:  # the reference's `out_channels or in_channels`
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        if "axes_dims_rope" in kw:
            kw["axes_dims_rope"] = tuple(kw["axes_dims_rope"])
        return cls(**kw)

    @classmethod
    def tiny(cls) -> "TransformerConfig":
        return cls(
            in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        )


# --- math -------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Variance in float32, then cast to the weight's dtype before scaling: diffusers' RMSNorm.
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(weight.dtype) * weight


def layer_norm(x: Tensor) -> Tensor:
    # Every LayerNorm in this model is affine-free; modulation supplies scale and shift.
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """(B,) t in [0, 1] -> (B, dim) float32 [cos | sin] embedding of t * 1000."""
    # diffusers Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000), all float32;
    # only t itself arrives rounded to the model dtype (see forward).
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000 * (t.float()[:, None] * freqs[None])  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)


def joint_attention_mask(txt_mask: Tensor | None, img_len: int) -> Tensor | None:
    """(B, S) text mask -> (B, 1, 1, S + img_len) bool key mask over [text; image], or None if no padding."""
    # Only keys are masked: padded text queries still run (their outputs never reach the image).
    # No padding -> None, so SDPA keeps its flash kernel (the reference pipeline also passes None then).
    if txt_mask is None:
        return None
    txt_mask = txt_mask.bool()
    if txt_mask.all():
        return None
    img_mask = txt_mask.new_ones(txt_mask.shape[0], img_len)
    return torch.cat([txt_mask, img_mask], dim=1)[:, None, None, :]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """(B, N, H, D) each -> (B, N, H*D)."""
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return x.transpose(1, 2).flatten(2)


def split_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, kept: Tensor, rest: Tensor) -> Tensor:
    """Inpainting attention, (B, N, H, D) each -> (B, N, H*D): `kept` queries see only `kept` keys; `rest` see all.

    kept, rest: disjoint index tensors covering 0..N-1. mask: key mask for the `rest` queries (text padding).
    Equals one SDPA call with the dense N x N mask of the inpainting article, but no N x N mask is built
    and the kept group (usually most tokens) runs unmasked, so on CUDA it keeps the flash kernel.
    """
    def pick(x, idx):  # index_select, not x[:, idx]: advanced indexing gathers ~2x slower on CPU
        return x.index_select(1, idx)

    x = q.new_empty(*q.shape[:2], q.shape[2] * q.shape[3])
    x.index_copy_(1, kept, attention(pick(q, kept), pick(k, kept), pick(v, kept), None))
    x.index_copy_(1, rest, attention(pick(q, rest), k, v, mask))
    return x


class AttentionPlan(NamedTuple):
    """Who attends to whom, and which image tokens are noisy: built once per forward and shared by every
    block, like the rope tables."""

    mask: Tensor | None  # (B, 1, 1, S + L) text padding key mask; None when there is no padding
    kept: Tensor | None = None  # (K,) [text; image] indices of kept image tokens; None = plain attention
    rest: Tensor | None = None  # (S + L - K,) indices of text and edited image tokens: they see everything
    noisy: int | None = None  # image tokens [0, noisy) are the noisy grid's, the rest reference images'
    # Sequence parallelism (qimg.parallel.ulysses.Exchange): the blocks hold a shard of the tokens, and attention
    # trades them for heads (to_heads) and back (to_tokens). None: one process holds every token.
    exchange: object | None = None


def attention_plan(txt_mask: Tensor | None, keep: Tensor | None, txt_len: int, img_len: int,
                   noisy: int | None = None) -> AttentionPlan:
    """Plan for the joint [text; image] sequence. keep: (L,) bool, True = image token outside the edit mask."""
    mask = joint_attention_mask(txt_mask, img_len)
    if keep is None or not keep.any():  # nothing kept: plain joint attention
        return AttentionPlan(mask, noisy=noisy)
    kept = keep.nonzero()[:, 0] + txt_len  # positions in [text; image]
    edited = (~keep).nonzero()[:, 0] + txt_len
    return AttentionPlan(mask, kept, torch.cat([torch.arange(txt_len, device=keep.device), edited]), noisy)


def tokenwise(fn, x: Tensor, *params: Tensor, split: int | None) -> Tensor:
    """fn(x, *params) for (B, L, dim) x and (B, K, dim) modulation params. K = 1: every token takes row 0.
    K = 2 (zero_cond_t): tokens [0, split) take row 0, the rest row 1, without a (B, L, dim) copy of each."""
    if params[0].shape[1] == 1:
        return fn(x, *params)
    head = fn(x[:, :split], *(p[:, :1] for p in params))
    tail = fn(x[:, split:], *(p[:, 1:] for p in params))
    return torch.cat([head, tail], dim=1)


# --- modules ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class TimestepEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int, bias: bool = True):  # Qwen-Image-2.1's has no biases
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Keys net.0.proj / net.2 as in diffusers' FeedForward; slot 1 is its dropout.
        up = nn.ModuleDict({"proj": nn.Linear(dim, mult * dim)})
        self.net = nn.ModuleList([up, nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        up, _, down = self.net
        return down(F.gelu(up["proj"](x), approximate="tanh"))


class JointAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.head_dim = head_dim = dim // num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))  # image stream
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))  # text stream
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # key to_out.0; the reference's to_out.1 is dropout
        self.to_add_out = nn.Linear(dim, dim)

    def forward(
        self, img: Tensor, txt: Tensor, rope: tuple[Tensor, Tensor], plan: AttentionPlan
    ) -> tuple[Tensor, Tensor]:
        def heads(x):  # (B, N, H*D) -> (B, N, H, D); H is this rank's share under tensor parallelism
            return x.unflatten(-1, (-1, self.head_dim))

        # Per-stream projections and QK norms, then one sequence [text; image] (the reference's order).
        txt_q, txt_k, txt_v = (heads(proj(txt)) for proj in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        img_q, img_k, img_v = (heads(proj(img)) for proj in (self.to_q, self.to_k, self.to_v))
        q = torch.cat([self.norm_added_q(txt_q), self.norm_q(img_q)], dim=1)  # (B, S + L, H, D)
        k = torch.cat([self.norm_added_k(txt_k), self.norm_k(img_k)], dim=1)
        v = torch.cat([txt_v, img_v], dim=1)
        if plan.exchange is not None:  # this rank's tokens, every head -> every token, this rank's heads
            q, k, v = plan.exchange.to_heads(q, k, v)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if plan.kept is None:
            x = attention(q, k, v, plan.mask)  # (B, S + L, dim)
        else:
            x = split_attention(q, k, v, plan.mask, plan.kept, plan.rest)
        if plan.exchange is not None:
            x = plan.exchange.to_tokens(x)
        s = txt.shape[1]
        return self.to_out[0](x[:, s:]), self.to_add_out(x[:, :s])


class QwenImageBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        # SiLU + Linear to 6*dim: (shift, scale, gate) for attention, then for the MLP.
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, num_heads)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor], plan: AttentionPlan
    ) -> tuple[Tensor, Tensor]:
        """vec: (B, K, dim) timestep embeddings; row 0 is t, row 1 (zero_cond_t) t = 0 for reference tokens."""
        # prepare img: each modulation tensor is (B, K, dim), applied per token by tokenwise
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec).chunk(6, -1)
        img_x = tokenwise(modulate, layer_norm(img), img_shift1, img_scale1, split=plan.noisy)

        # prepare txt: the text stream always takes t
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec[:, :1]).chunk(6, -1)
        txt_x = modulate(layer_norm(txt), txt_shift1, txt_scale1)

        # joint attention
        img_attn, txt_attn = self.attn(img_x, txt_x, rope, plan)

        # img residuals
        img = img + tokenwise(torch.mul, img_attn, img_gate1, split=plan.noisy)
        img_x = tokenwise(modulate, layer_norm(img), img_shift2, img_scale2, split=plan.noisy)
        img = img + tokenwise(torch.mul, self.img_mlp(img_x), img_gate2, split=plan.noisy)

        # txt residuals
        txt = txt + txt_gate1 * txt_attn
        txt = txt + txt_gate2 * self.txt_mlp(modulate(layer_norm(txt), txt_shift2, txt_scale2))

        if img.dtype == torch.float16:  # the reference clips so fp16 residuals stay finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class AdaNormOut(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        # (scale, shift) here, the opposite of the blocks' (shift, scale): diffusers' AdaLayerNormContinuous.
        scale, shift = self.linear(F.silu(vec).to(x.dtype))[:, None].chunk(2, dim=-1)
        return modulate(layer_norm(x), shift, scale)


class QwenImageTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.time_text_embed = nn.ModuleDict({"timestep_embedder": TimestepEmbedder(256, dim)})
        self.txt_norm = RMSNorm(cfg.joint_attention_dim)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageBlock(dim, cfg.num_attention_heads) for _ in range(cfg.num_layers)
        )
        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size * cfg.patch_size * cfg.out_channels)

    def forward(
        self, img: Tensor, txt: Tensor, txt_mask: Tensor | None, t: Tensor, grid: tuple[int, int],
        keep: Tensor | None = None, refs: tuple[tuple[int, int], ...] = (),
    ) -> Tensor:
        """Velocity (B, N, patch*patch*out_channels) for packed latents img (B, L, in_channels).

        txt: (B, S, joint_attention_dim) text hidden states; txt_mask: (B, S), 1 = real token, or None.
        t: (B,) in [0, 1] (the reference pipeline's timestep / 1000). grid: (h, w) in patches of the noisy
        image, N == h*w. refs: (h, w) grids of reference images (instruction editing) whose clean tokens
        follow the noisy ones in img, so L == N + their sizes; only the noisy tokens' velocity is returned
        (the reference pipelines slice it so).
        keep: optional (N,) bool inpainting attention mask, True = kept token (outside the edit), shared by
        the batch. Kept tokens then attend only to kept tokens; text, edited and reference tokens attend to
        everything, so information flows into the hole but never back out. None = plain attention.
        """
        grids = (tuple(grid), *map(tuple, refs))
        n, need = grid[0] * grid[1], sum(h * w for h, w in grids)
        if img.shape[1] != need:
            sizes = " + ".join(f"{h}x{w}" for h, w in grids)
            raise ValueError(f"image has {img.shape[1]} tokens but grids {sizes} need {need}")
        if keep is not None and (keep.dtype != torch.bool or keep.shape != (n,)):
            raise ValueError(f"keep must be a bool tensor of shape ({n},), got {keep.dtype} {tuple(keep.shape)}")
        img = self.img_in(img)  # (B, L, dim)
        txt = self.txt_in(self.txt_norm(txt))  # (B, S, dim)
        t = t.to(img.dtype)  # the reference rounds t to the model dtype before embedding it
        if self.cfg.zero_cond_t and refs:  # row 1: t = 0 for the reference tokens (diffusers' modulate_index)
            t = torch.stack([t, t * 0], dim=1)  # (B, 2)
        vec = self.time_text_embed["timestep_embedder"](timestep_embedding(t.flatten()).to(img.dtype))
        vec = vec.reshape(img.shape[0], -1, vec.shape[-1])  # (B, K, dim)
        cos, sin = joint_rope(grids, txt.shape[1], tuple(self.cfg.axes_dims_rope))
        rope = (cos.to(img.device), sin.to(img.device))  # (S + L, head_dim/2) float32
        if keep is not None:  # reference tokens are never kept: like text, they see everything
            keep = torch.cat([keep.to(img.device), keep.new_zeros(img.shape[1] - n, device=img.device)])
        plan = attention_plan(txt_mask, keep, txt.shape[1], img.shape[1], n)

        img, txt = self.run_blocks(img, txt, vec, rope, plan)
        return self.proj_out(self.norm_out(img[:, :n], vec[:, 0]))

    def run_blocks(self, img: Tensor, txt: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor], plan: AttentionPlan):
        """The block stack. Offloading replaces this with one that streams the blocks' weights (offload.py)."""
        for block in self.transformer_blocks:
            img, txt = block(img, txt, vec, rope, plan)
        return img, txt

    def compile_blocks(self) -> None:
        """torch.compile each block, not the whole model: one graph, reused 60 times, keeps cold start short."""
        for block in self.transformer_blocks:
            block.compile()


# --- latent packing ---------------------------------------------------------------------------------


def patchify(latents: Tensor, patch_size: int = 2) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), the reference pipeline's _pack_latents ordering."""
    b, c, h, w = latents.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: Tensor, h: int, w: int, patch_size: int = 2) -> Tensor:
    """(B, h/p * w/p, C*p*p) -> (B, C, h, w); h, w are latent pixels (not patches). Inverse of patchify."""
    b, n, d = x.shape
    p = patch_size
    if n != (h // p) * (w // p) or h % p or w % p:
        raise ValueError(f"{n} tokens do not form a {h}x{w} latent with patch size {p}")
    x = x.reshape(b, h // p, w // p, d // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
    return x.reshape(b, d // (p * p), h, w)
