"""Qwen3-VL's vision tower with its DeepStack features, and the encoder that joins it to the language model.

A native replacement for transformers' Qwen3VLVisionModel, for still images. Patch rows (3 channels x 2 frames
x 16 x 16, from qwen3vl_image.py) arrive in 2x2 merge-block-major order; a 3D convolution embeds them, a
learned 48x48 position table resampled bilinearly (corners aligned) to the picture's patch grid is added,
and blocks with LayerNorm, GELU (tanh) MLPs and a 2D rotary embedding attend over each whole picture (no
windows, unlike Qwen2.5-VL). The last block's patches are merged 2x2 into tokens of the language model's width;
the outputs of the `deepstack_visual_indexes` blocks are merged by their own mergers (normalised after the 2x2
shuffle) into the DeepStack features the language model adds to its first layers. Module names are the
checkpoint keys after `remap_keys`.

For the engine (model/qwen3vl_image.py cuts the pictures, weights/qwen3vl.py loads the model):
    encoder = load_qwen3vl(folder / "text_encoder", dtype, device)          # a Qwen3VLEncoder
    image_cfg = load_image_config(folder / "processor", encoder.visual.cfg)
    rows, grid = qwen3vl_image.preprocess(picture, image_cfg)               # per picture, PIL RGBA or RGB
    hidden = encoder(input_ids, attention_mask, pixel_values, grids)       # (B, N, hidden), before the norm
input_ids carry each <|image_pad|> expanded to its picture's rows * cols / 4 tokens (the processor's expansion);
pixel_values are the pictures' rows concatenated in that order, grids their (rows, cols). mm_token_type_ids are
not needed: the picture tokens are where input_ids hold the config's image_token_id.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.model.qwen3vl import Qwen3VLTextModel
from qimg.model.vision import Attention, PatchEmbed, patch_positions, rope_tables

EPS = 1e-6  # every LayerNorm of the tower (transformers hard-codes it)


@dataclass(frozen=True)
class Qwen3VLVisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 4096  # the language model's width
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2  # 2x2 patches become one language-model token
    temporal_patch_size: int = 2  # a still image is its own frame pair
    num_position_embeddings: int = 2304  # a 48x48 table of learned positions, resampled to each picture
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)  # blocks whose output feeds the first LM layers
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def side(self) -> int:
        """The learned position table's side."""
        return int(self.num_position_embeddings ** 0.5)

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3VLVisionConfig":
        """From text_encoder/config.json's `vision_config`."""
        v = d.get("vision_config")
        if not isinstance(v, dict):
            raise ValueError("it has no vision_config: this text encoder has no vision tower")
        kw = {f.name: v[f.name] for f in dataclasses.fields(cls) if f.name in v}
        kw["deepstack_visual_indexes"] = tuple(kw.get("deepstack_visual_indexes", cls.deepstack_visual_indexes))
        rope = v.get("rope_parameters") or {}
        kw["rope_theta"] = rope.get("rope_theta", cls.rope_theta)
        if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config hidden_act={v['hidden_act']!r} is not supported (Qwen3-VL uses "
                             "gelu_pytorch_tanh)")
        cfg = cls(**kw)
        if cfg.side ** 2 != cfg.num_position_embeddings:
            raise ValueError(f"vision_config num_position_embeddings {cfg.num_position_embeddings} is not a square")
        if not all(0 <= i < cfg.depth for i in cfg.deepstack_visual_indexes):
            raise ValueError(f"vision_config deepstack_visual_indexes {list(cfg.deepstack_visual_indexes)} are not "
                             f"all blocks of its {cfg.depth}")
        return cfg

    @classmethod
    def tiny(cls) -> "Qwen3VLVisionConfig":
        return cls(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   num_position_embeddings=64, deepstack_visual_indexes=(0, 2))


def remap_keys(key: str) -> str | None:
    """Checkpoint key -> our key, or None to skip it unread."""
    if key.startswith("model.visual."):  # transformers >= 5's layout, the one Qwen3-VL ships in
        return key[len("model.visual."):]
    return None  # the language model and lm_head


# --- math -------------------------------------------------------------------------------------------


def axis_taps(index: Tensor, size: int, side: int) -> tuple[Tensor, Tensor]:
    """(n, 2) table rows and weights that resample a `side`-long axis to `size` at `index`, bilinear with
    corners aligned (F.interpolate's, as the reference's vision_utils writes it, in float32)."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = src.floor()
    taps = floor.long()[:, None] + torch.arange(2)
    weights = (1 - (src[:, None] - floor[:, None] - torch.arange(2)).abs()).clamp(min=0)
    return taps.clamp(0, side - 1), weights


def position_taps(grids: list[tuple[int, int]], merge: int, side: int) -> tuple[Tensor, Tensor]:
    """(N, 4) rows of the flattened position table and their weights for every patch, in merge-block order."""
    indices, weights = [], []
    for (h, w), positions in zip(grids, patch_positions(grids, merge).split([h * w for h, w in grids])):
        row, col = positions.unbind(1)
        row_taps, row_weights = axis_taps(row, h, side)
        col_taps, col_weights = axis_taps(col, w, side)
        indices.append((row_taps[:, :, None] * side + col_taps[:, None, :]).flatten(1))
        weights.append((row_weights[:, :, None] * col_weights[:, None, :]).flatten(1))
    return torch.cat(indices), torch.cat(weights)


# --- modules ----------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=EPS)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=EPS)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], lengths: list[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig, after_shuffle: bool):
        """after_shuffle: normalise the 2x2 block's concatenated patches (the DeepStack mergers) rather than
        each patch (the final merger)."""
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.after_shuffle = after_shuffle
        self.norm = nn.LayerNorm(width if after_shuffle else cfg.hidden_size, eps=EPS)
        self.linear_fc1 = nn.Linear(width, width)
        self.linear_fc2 = nn.Linear(width, cfg.out_hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """(N, hidden) patches, each 2x2 block consecutive -> (N/4, out_hidden) tokens."""
        width = self.linear_fc1.in_features
        x = self.norm(x.view(-1, width)) if self.after_shuffle else self.norm(x).view(-1, width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3VLVisionTower(nn.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size,
                                      _weight=torch.empty(cfg.num_position_embeddings, cfg.hidden_size))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.merger = Merger(cfg, after_shuffle=False)
        self.deepstack_merger_list = nn.ModuleList(Merger(cfg, after_shuffle=True)
                                                   for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: Tensor, grids: list[tuple[int, int]]) -> tuple[Tensor, list[Tensor]]:
        """(N, C*T*P*P) patch rows of every picture, each picture's (rows, cols) in patches -> (N/4, out_hidden)
        tokens, picture after picture in the order of their <|image_pad|> tokens, and the DeepStack features,
        one (N/4, out_hidden) per `deepstack_visual_indexes` block."""
        cfg, device = self.cfg, pixel_values.device
        x = self.patch_embed(pixel_values)
        indices, weights = position_taps(grids, cfg.spatial_merge_size, cfg.side)
        x = x + (self.pos_embed(indices.to(device)) * weights.to(device)[:, :, None]).sum(1).to(x.dtype)
        cos, sin = rope_tables(patch_positions(grids, cfg.spatial_merge_size).to(device), cfg.head_dim,
                               cfg.rope_theta)
        pictures, deepstack = [h * w for h, w in grids], []
        for i, block in enumerate(self.blocks):
            x = block(x, (cos, sin), pictures)
            if i in cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack


class Qwen3VLEncoder(nn.Module):
    """The language model and the vision tower together: what the pipeline's text_encoder call computes."""

    def __init__(self, language_model: Qwen3VLTextModel, visual: Qwen3VLVisionTower):
        super().__init__()
        self.language_model, self.visual = language_model, visual

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                grids: list[tuple[int, int]] = ()) -> Tensor:
        """(B, N) token ids, (B, N) 1 = real token -> (B, N, hidden) the last decoder layer's output before the
        final norm. pixel_values: every picture's patch rows, concatenated in the order of the <|image_pad|>
        runs (row after row of the batch); grids: each picture's (rows, cols) in patches (grid_thw without its
        leading 1)."""
        if pixel_values is None:
            return self.language_model(input_ids, attention_mask)
        merge = self.visual.cfg.spatial_merge_size
        images, deepstack = self.visual(pixel_values, list(grids))
        return self.language_model(input_ids, attention_mask, images, deepstack,
                                   [(h // merge, w // merge) for h, w in grids])
