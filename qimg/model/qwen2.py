"""The language model of Qwen2.5-VL: what Qwen-Image's prompt encoder runs.

A native replacement for transformers' Qwen2_5_VLForConditionalGeneration's language model: no vocabulary
head, no KV cache. For text-only input the model's 3-section mRoPE gives all three sections the same
position id, so it reduces to ordinary 1D RoPE over the whole head dim. The edit models splice the vision
tower's tokens in at the <|image_pad|> tokens and give them 3D positions (`mrope_positions`): the rotary
frequencies are split in `mrope_section` parts turned by the frame, row and column position (tested against
transformers). Module names are the checkpoint keys after `remap_keys`.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4  # grouped-query attention: 7 query heads share each key/value head
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # rotary frequency slots turned by frame, row, column
    image_token_id: int = 151655  # <|image_pad|>: where the vision tower's tokens go

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2Config":
        """From text_encoder/config.json: transformers >= 5 nests the text fields under `text_config` and
        the rope base under `rope_parameters`; older saves (Qwen/Qwen-Image's) keep both at the top."""
        text = {**d, **d.get("text_config", {})}
        rope = text.get("rope_parameters") or {}
        kw = {f.name: text[f.name] for f in dataclasses.fields(cls) if f.name in text}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        sections = rope.get("mrope_section") or (text.get("rope_scaling") or {}).get("mrope_section")
        kw["mrope_section"] = tuple(sections or cls.mrope_section)
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"text encoder hidden_act={text['hidden_act']!r} is not supported (Qwen2.5-VL uses silu)")
        return cls(**kw)

    @classmethod
    def tiny(cls) -> "Qwen2Config":
        return cls(vocab_size=407, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, mrope_section=(2, 3, 3))


def remap_keys(key: str) -> str | None:
    """Checkpoint key -> our key, or None to skip it unread."""
    for prefix in ("model.language_model.", "model."):  # transformers >= 5's own layout; older saves
        if key.startswith(prefix) and not key.startswith("model.visual."):
            return key[len(prefix):]
    return None  # the vision tower (visual.*, model.visual.*) and lm_head: prompt encoding needs neither


# --- math -------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in float32, cast back to x's dtype, then scale: transformers' Qwen2RMSNorm order.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_table(n: int, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """cos, sin (n, head_dim) for positions 0..n-1, halves duplicated for `rotate_half`, in `dtype`."""
    # The reference's float32 expression; rounded to the activations' dtype like the reference.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    angles = torch.arange(n, device=device).float()[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def mrope_positions(image: Tensor, grids: list[tuple[int, int]]) -> Tensor:
    """(3, N) frame, row, column position of each token. image: (N,) True at <|image_pad|> tokens, one run per
    grid; grids: each picture's (rows, cols) in merged tokens. Text counts up by one in all three; a picture
    starting at s is (s, s + row, s + col), and the text after it resumes at s + max(rows, cols) (the
    reference's get_rope_index)."""
    flags, out, pos, i = image.tolist(), [], 0, 0
    grids = iter(grids)
    while i < len(flags):
        if flags[i]:
            rows, cols = next(grids)
            r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            out.append(torch.stack([torch.zeros(rows * cols, dtype=torch.long), r.flatten(), c.flatten()]) + pos)
            pos, i = pos + max(rows, cols), i + rows * cols
        else:
            j = flags.index(True, i) if True in flags[i:] else len(flags)
            out.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
    return torch.cat(out, dim=1)


def mrope_table(positions: Tensor, head_dim: int, theta: float, sections: tuple[int, ...], dtype: torch.dtype,
                device) -> tuple[Tensor, Tensor]:
    """cos, sin (N, head_dim) for (3, N) positions: frequency slots split in `sections`, the first turned by
    the frame position, the next by the row, the last by the column; halves duplicated for `rotate_half`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    angles = positions.to(device)[..., None].float() * inv_freq  # (3, N, head_dim/2)
    angles = torch.cat([part[axis] for axis, part in enumerate(angles.split(list(sections), dim=-1))], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """(B, H, N, D) rotated by (N, D) tables; channel i pairs with i + D/2 (the Llama/Qwen layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_mask(attention_mask: Tensor | None, n: int, device) -> Tensor | None:
    """(B, 1, N, N) bool: each token sees earlier real tokens; None (plain causal) when nothing is padded."""
    if attention_mask is None or attention_mask.bool().all():
        return None
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return causal & attention_mask.bool()[:, None, None, :]


# --- modules ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.heads, self.kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * d)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d)
        self.o_proj = nn.Linear(self.heads * d, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        def heads(t, n):  # (B, N, n*D) -> (B, n, N, D)
            return t.unflatten(-1, (n, -1)).transpose(1, 2)

        q = heads(self.q_proj(x), self.heads)
        k, v = heads(self.k_proj(x), self.kv_heads), heads(self.v_proj(x), self.kv_heads)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        group = self.heads // self.kv_heads  # each key/value head serves `group` query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        # Given a weight, Embedding skips its normal_ init: on the meta device that init imports torch._dynamo
        # (~2-4 s of a run's start) and the loader overwrites the weight anyway.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, images: Tensor | None = None,
                positions: Tensor | None = None) -> Tensor:
        """(B, N) token ids, (B, N) 1 = real token (padding on the right) -> (B, N, hidden) last hidden state,
        after the final norm (the reference's `hidden_states[-1]`). images: (tokens, hidden) from the vision
        tower, replacing the <|image_pad|> tokens' embeddings in order; positions: (3, N) from
        `mrope_positions`, shared by the batch (else 0..N-1)."""
        x = self.embed_tokens(input_ids)
        if images is not None:
            x[input_ids == self.cfg.image_token_id] = images.to(x.dtype)
        n, cfg = input_ids.shape[1], self.cfg
        if positions is None:  # 0..n-1 even for padded rows: the reference does the same for text-only input
            rope = rope_table(n, cfg.head_dim, cfg.rope_theta, x.dtype, x.device)
        else:
            rope = mrope_table(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype, x.device)
        mask = causal_mask(attention_mask, n, x.device)
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.norm(x)
