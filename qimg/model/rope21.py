"""Qwen-Image-2.1's joint sequence: where text, picture and noise tokens sit, who sees whom, and their 3D rope.

The text encoder's sequence holds one slot per 2x2 group of a picture's latents (its image-pad tokens); the
transformer widens each slot into those 4 latent tokens and appends the target (noise) picture's tokens last:

    [text | picture 1 | text | picture 2 | ... | text | target]

Everything before the target is the *prefix*. Attention is block-causal: a text token sees itself and what
precedes it, a picture token also sees the rest of its own picture, and the target sees everything. Positions
match diffusers' `QwenImage21Rope`: text advances one position on all three axes; a picture freezes the frame
axis at the position reached, centres its rows and columns on zero, and moves the position on by max(h, w).
A `Layout` is built once per image and shared by every step and block.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from qimg.model.rope import image_positions, rope_angles

SLOT = 4  # latent tokens per text-encoder image slot (a 2x2 group)


@dataclass(frozen=True)
class Layout:
    """The joint sequence of one request (all samples of a batch share it, as in the reference)."""

    image: Tensor  # (N,) bool: latent tokens (pictures and target); the rest are text
    text_slots: Tensor  # (S,) bool over the text encoder's sequence: its text (non-picture) positions
    prefix: int  # tokens before the target's: text and condition pictures
    segments: tuple[tuple[int, int, bool], ...]  # prefix runs (start, end, is_text): each sees keys [0, end)
    cos: Tensor  # (N, head_dim/2) float32 rope tables
    sin: Tensor
    key_valid: Tensor | None  # (B, N) bool, False at padded text; None when nothing is padded
    exchange: object = None  # under --ulysses, parallel/ulysses.Exchange: attention's all-to-alls (tokens <-> heads)

    @property
    def length(self) -> int:
        return self.image.shape[0]


def joint_image_mask(img_mask: Tensor, target: tuple[int, int]) -> Tensor:
    """(S,) bool slot mask of the text encoder's sequence -> (N,) bool latent-token mask of the joint sequence,
    with the target's slots appended (the reference pipeline's `append_target_slots` then `repeat_interleave`)."""
    h, w = target
    if (h * w) % SLOT:
        raise ValueError(f"the target grid {h}x{w} is not a whole number of 2x2 slots")
    slots = torch.cat([img_mask.bool(), img_mask.new_ones(h * w // SLOT, dtype=torch.bool)])
    return torch.repeat_interleave(slots, torch.where(slots, SLOT, 1))


def token_positions(image: list[bool], grids: list[tuple[int, int]]) -> Tensor:
    """(N, 3) integer (frame, row, col) positions; grids: (h, w) of each picture in order, the target last."""
    pos, cursor, position = [], 0, 0
    for h, w in grids:
        start = image.index(True, cursor)  # pictures are contiguous runs; their sizes come from the grids
        text = torch.arange(position, position + start - cursor)
        position += start - cursor
        pos += [text[:, None].expand(-1, 3), image_positions(h, w, position)]
        cursor, position = start + h * w, position + max(h, w)
    rest = torch.arange(position, position + len(image) - cursor)  # text after the last picture (none in 2.1)
    pos.append(rest[:, None].expand(-1, 3))
    return torch.cat(pos)


def prefix_segments(image: list[bool], grids: list[tuple[int, int]], prefix: int) -> tuple[tuple[int, int, bool], ...]:
    """Runs of text and of one picture each, by the grids' token counts: two adjacent pictures stay two blocks."""
    segments, cursor = [], 0
    for h, w in grids[:-1]:
        start = image.index(True, cursor)
        if start > cursor:
            segments.append((cursor, start, True))
        segments.append((start, start + h * w, False))
        cursor = start + h * w
    if prefix > cursor:
        segments.append((cursor, prefix, True))
    return tuple(segments)


def build_layout(img_mask: Tensor, grids: list[tuple[int, int]], axes_dims: tuple[int, ...],
                 txt_mask: Tensor | None = None, device: torch.device | str = "cpu", theta: float = 10000.0) -> Layout:
    """The Layout of a request.

    img_mask: (S,) or (B, S) bool, True at the text encoder's image-pad slots (row 0 is read: samples share a
    layout); grids: (h, w) latent grids of the condition pictures in prompt order, then the target's;
    txt_mask: (B, S) 1 at real tokens, 0 at padding, or None; device: where the rope tables and key mask go.
    Raises ValueError on inconsistent sizes.
    """
    img_mask = (img_mask[0] if img_mask.dim() == 2 else img_mask).cpu()
    image = joint_image_mask(img_mask, grids[-1])
    need = sum(h * w for h, w in grids)
    if int(image.sum()) != need:
        sizes = " + ".join(f"{h}x{w}" for h, w in grids)
        raise ValueError(f"the text encoder's sequence has {int(image.sum()) - grids[-1][0] * grids[-1][1]} picture "
                         f"tokens (4 per image slot) but the condition grids in {sizes} need "
                         f"{need - grids[-1][0] * grids[-1][1]}")
    flags = image.tolist()
    prefix = len(flags) - grids[-1][0] * grids[-1][1]
    angles = rope_angles(token_positions(flags, grids), axes_dims, theta)
    text_slots = ~img_mask.bool()
    key_valid = None
    if txt_mask is not None and not txt_mask.bool().all():
        if txt_mask.shape[1] != img_mask.shape[0]:
            raise ValueError(f"txt_mask covers {txt_mask.shape[1]} tokens but img_mask {img_mask.shape[0]}")
        key_valid = torch.ones(txt_mask.shape[0], len(flags), dtype=torch.bool)
        key_valid[:, ~image] = txt_mask.bool().cpu()[:, text_slots]
        key_valid = key_valid.to(device)
    return Layout(image.to(device), text_slots.to(device), prefix, prefix_segments(flags, grids, prefix),
                  angles.cos().to(device), angles.sin().to(device), key_valid)
