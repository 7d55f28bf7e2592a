"""The language model of Qwen3-VL: what Qwen-Image-2.1's prompt encoder runs.

A native replacement for the language model of transformers' Qwen3VLForConditionalGeneration: no vocabulary
head, no KV cache, no final norm applied. Against Qwen2.5-VL (qwen2.py) the attention has no biases and
RMS-normalises each query and key head before the rotary embedding, and the 3D mRoPE is *interleaved*: rotary
frequency slot i turns with the row position when i % 3 == 1, the column when i % 3 == 2 (up to
`mrope_section`'s counts), and the frame position otherwise. Pictures come in twice: the vision tower's tokens
replace the <|image_pad|> embeddings, and its DeepStack features are added to the picture positions' hidden
states after each of the first decoder layers. Module names are the checkpoint keys after `remap_keys`.

The engine's entry point is `Qwen3VLTextModel.forward`; `Qwen3VLEncoder` (qwen3vl_vision.py) runs the vision
tower and this model together. The output is the last decoder layer's hidden state *before* the final RMSNorm:
what Qwen-Image-2.1 was trained on (diffusers' QwenImage21Pipeline hooks the norm away to get it).
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.model.qwen2 import MLP, RMSNorm, apply_rope, mrope_positions


@dataclass(frozen=True)
class Qwen3VLTextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # grouped-query attention: 4 query heads share each key/value head
    head_dim: int = 128  # given, not hidden_size / heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5000000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)  # frequency slots turned by frame, row, column
    image_token_id: int = 151655  # <|image_pad|>: where the vision tower's tokens go

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3VLTextConfig":
        """From text_encoder/config.json: the fields under `text_config`, the rope base and sections under its
        `rope_parameters` (transformers >= 5) or `rope_theta` and `rope_scaling` (4.57's saves)."""
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ValueError("it has no text_config: it is not a Qwen3-VL text encoder's config")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        kw = {f.name: text[f.name] for f in dataclasses.fields(cls) if f.name in text}
        kw["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", cls.rope_theta))
        kw["mrope_section"] = tuple(rope.get("mrope_section") or cls.mrope_section)
        if "image_token_id" in d:
            kw["image_token_id"] = d["image_token_id"]
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"text_config hidden_act={text['hidden_act']!r} is not supported (Qwen3-VL uses silu)")
        if text.get("attention_bias", False):
            raise ValueError("text_config attention_bias=true is not supported (Qwen3-VL's attention has no biases)")
        if rope.get("rope_type", "default") != "default" or rope.get("mrope_interleaved") is False:
            raise ValueError(f"text_config rope {rope!r:.80} is not supported (Qwen3-VL's is the default type, "
                             "interleaved)")
        if sum(kw["mrope_section"]) != kw.get("head_dim", cls.head_dim) // 2:
            raise ValueError(f"mrope_section {list(kw['mrope_section'])} does not add up to half the head dim")
        return cls(**kw)

    @classmethod
    def tiny(cls) -> "Qwen3VLTextConfig":
        return cls(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, rope_theta=10000.0, mrope_section=(2, 3, 3), image_token_id=200)


def remap_keys(key: str) -> str | None:
    """Checkpoint key -> our key, or None to skip it unread."""
    if key == "model.language_model.norm.weight":
        return None  # the final norm: the pipeline reads the hidden state before it
    if key.startswith("model.language_model."):  # transformers >= 5's layout, the one Qwen3-VL ships in
        return key[len("model.language_model."):]
    return None  # the vision tower (model.visual.*) and lm_head: prompt encoding needs neither


# --- math -------------------------------------------------------------------------------------------


def text_positions(n: int) -> Tensor:
    """(3, n) positions of a row without pictures: 0..n-1 on every axis, padding included (the reference
    numbers a text-only batch's padded rows from 0 too; RoPE being relative, only the rounding could tell)."""
    return torch.arange(n).expand(3, -1)


def row_positions(image: Tensor, real: Tensor, grids: list[tuple[int, int]]) -> Tensor:
    """(3, N) positions of one row with pictures: its real tokens numbered as `mrope_positions` does (picture
    runs in 2D, in the order of `grids`, rows and columns in merged tokens), padding at 0 (the reference's
    get_rope_index over the unpadded tokens)."""
    out = torch.zeros(3, image.shape[0], dtype=torch.long)
    out[:, real] = mrope_positions(image[real], grids)
    return out


def interleaved_table(positions: Tensor, head_dim: int, theta: float, sections: tuple[int, ...],
                      dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """cos, sin (B, N, head_dim) for (3, B, N) positions, in `dtype`: frequency slot i turns with the row when
    i % 3 == 1 and i < 3 * sections[1], with the column when i % 3 == 2 and i < 3 * sections[2], else with the
    frame; halves duplicated for `rotate_half` (the reference's interleaved recomposition)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    angles = positions.to(device)[..., None].float() * inv_freq  # (3, B, N, head_dim/2)
    axis = torch.zeros(head_dim // 2, dtype=torch.long, device=device)
    axis[1:3 * sections[1]:3], axis[2:3 * sections[2]:3] = 1, 2
    angles = angles.gather(0, axis.expand_as(angles[:1])).squeeze(0)  # slot i from axis[i]'s row of angles
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def padded_causal_mask(attention_mask: Tensor | None, n: int, device) -> Tensor | None:
    """(B, 1, N, N) bool: each token sees the earlier real tokens; None (plain causal) when nothing is padded.
    Each token also sees itself, so a left pad (which has no earlier real token) attends somewhere rather
    than yielding NaN that later layers would carry; real tokens never see a pad either way."""
    if attention_mask is None or attention_mask.bool().all():
        return None
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return torch.ones(n, n, dtype=torch.bool, device=device).tril() & attention_mask.bool()[:, None, None, :] | eye


# --- modules ----------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3VLTextConfig):
        super().__init__()
        self.heads, self.kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # over each head, before the rotary embedding
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        def heads(t, n):  # (B, N, n*D) -> (B, n, N, D)
            return t.unflatten(-1, (n, -1)).transpose(1, 2)

        q = self.q_norm(heads(self.q_proj(x), self.heads))
        k = self.k_norm(heads(self.k_proj(x), self.kv_heads))
        v = heads(self.v_proj(x), self.kv_heads)
        cos, sin = rope[0][:, None], rope[1][:, None]  # (B, 1, N, D): broadcast over heads
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.heads // self.kv_heads  # each key/value head serves `group` query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3VLTextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)  # qwen2's: the same gate/up/down SiLU MLP, no biases

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3VLTextModel(nn.Module):
    def __init__(self, cfg: Qwen3VLTextConfig):
        super().__init__()
        self.cfg = cfg
        # Given a weight, Embedding skips its normal_ init (see qwen2.Qwen2Model): the loader overwrites it.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def positions(self, input_ids: Tensor, attention_mask: Tensor | None,
                  grids: list[tuple[int, int]] | None) -> Tensor:
        """(3, B, N) rotary positions. grids: every picture's (rows, cols) in merged tokens, row after row of the
        batch, in the order of its <|image_pad|> runs; None for text only."""
        b, n = input_ids.shape
        if grids is None:
            return text_positions(n)[:, None].expand(3, b, n)
        image = (input_ids == self.cfg.image_token_id).cpu()
        real = torch.ones(b, n, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
        out, grids = [], iter(grids)
        for row, keep in zip(image, real):
            runs = int((row[keep][1:] & ~row[keep][:-1]).sum() + row[keep][0])  # pictures in this row
            out.append(row_positions(row, keep, [next(grids) for _ in range(runs)]))
        return torch.stack(out, dim=1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, images: Tensor | None = None,
                deepstack: list[Tensor] = (), grids: list[tuple[int, int]] | None = None) -> Tensor:
        """(B, N) token ids, (B, N) 1 = real token (padding on either side) -> (B, N, hidden) the last decoder
        layer's output, before the final norm. images: (tokens, hidden) from the vision tower, replacing the
        <|image_pad|> embeddings in order (row-major over the batch); deepstack: the tower's DeepStack features,
        each (tokens, hidden), added at those positions after decoder layers 0, 1, ...; grids: as `positions`."""
        cfg = self.cfg
        x = self.embed_tokens(input_ids)
        image = input_ids == cfg.image_token_id
        if images is not None:
            x[image] = images.to(x.dtype)
        rope = interleaved_table(self.positions(input_ids, attention_mask, grids), cfg.head_dim, cfg.rope_theta,
                                 cfg.mrope_section, x.dtype, x.device)
        mask = padded_causal_mask(attention_mask, input_ids.shape[1], x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask)
            if i < len(deepstack):
                x[image] = x[image] + deepstack[i].to(x.dtype)
        return x
