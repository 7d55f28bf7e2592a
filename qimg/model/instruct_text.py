"""Instruction encoding for the Qwen-Image-Edit family: the instruction and its pictures through Qwen2.5-VL,
exactly as the reference edit pipelines' `encode_prompt(prompt, image=...)` does it.

The instruction goes into the edit system template, with its pictures as <|vision_start|><|image_pad|>
<|vision_end|>: one inline picture for Qwen-Image-Edit, "Picture N: " and the picture before the text for
2509/2511. Each <|image_pad|> becomes as many tokens as the vision tower makes of its picture, the tower's
tokens are spliced in there, and the language model runs with 3D mRoPE positions (as Qwen2.5-VL was trained,
which diffusers 0.42.1 with transformers >= 5.15 no longer does: diffusers#14194). The last hidden state is
kept minus the 64-token system prefix, picture tokens included. Unlike the base model's prompts nothing is cut:
the reference applies no 512-token cap to edit prompts. A negative prompt is encoded with the same pictures.
The tokenizer, language model, vision tower and image config come in built: weights/text_encoder.py reads them
from a model folder.
"""

import numpy as np
import torch

from qimg.errors import UsageError
from qimg.model.qwen2 import Qwen2Model, mrope_positions
from qimg.model.tokenizer import Tokenizer
from qimg.model.vision import VisionTower
from qimg.model.vl_image import ImageConfig, preprocess

# The edit pipelines' system prompt; its prefix through "user\n" is DROP tokens.
SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"  # <|image_pad|> is expanded to the picture's tokens
EDIT_TEMPLATE = SYSTEM + PICTURE + "{}<|im_end|>\n<|im_start|>assistant\n"  # Qwen-Image-Edit: one inline picture
PLUS_TEMPLATE = SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"  # 2509/2511: "Picture N: " prefixes in the text
PLUS_PICTURE = "Picture {}: " + PICTURE
DROP = 64  # the reference's prompt_template_encode_start_idx: the system prefix, in Qwen2 tokens
IMAGE_PAD = "<|image_pad|>"


def prompt_text(prompt: str, pictures: int, plus: bool) -> str:
    """The text the reference's processor gets for one prompt, before <|image_pad|> is expanded."""
    if not plus:
        return EDIT_TEMPLATE.format(prompt)
    return PLUS_TEMPLATE.format("".join(PLUS_PICTURE.format(i + 1) for i in range(pictures)) + prompt)


def expand_image_pads(ids: list[int], pad: int, counts: list[int]) -> list[int]:
    """Each `pad` id repeated to its picture's token count, in order (the processor's replace_image_token)."""
    if ids.count(pad) != len(counts):
        raise UsageError(f"the instruction must not contain {IMAGE_PAD}: it marks where the pictures go")
    counts, out = iter(counts), []
    for i in ids:
        out.extend([i] * next(counts) if i == pad else [i])
    return out


class InstructEncoder:
    def __init__(self, tokenizer: Tokenizer, model: Qwen2Model, vision: VisionTower, image_cfg: ImageConfig,
                 plus: bool, dtype: torch.dtype, device: torch.device):
        """Qwen-Image-Edit's (plus=False) or 2509/2511's (plus=True) instruction encoder: the language model and
        vision tower (in dtype, on device), the tokenizer and the image processor's config."""
        self.tokenizer, self.model, self.vision, self.image_cfg = tokenizer, model, vision, image_cfg
        self.pad = tokenizer.bpe.token_to_id(IMAGE_PAD)
        self.plus, self.dtype, self.device = plus, dtype, device
        self.last = None  # (patch rows, grids, tower tokens) of the last pictures encoded

    def inputs(self, prompt: str, images: list[np.ndarray]) -> tuple[list[int], list[np.ndarray], list[tuple]]:
        """What the reference's processor makes of one prompt and its pictures: the token ids with every
        <|image_pad|> expanded, each picture's patch rows, and its grid (rows, cols) in patches."""
        if not self.plus and len(images) != 1:
            raise UsageError(f"a Qwen-Image-Edit model takes exactly one picture, not {len(images)}")
        patches = [preprocess(np.asarray(image), self.image_cfg) for image in images]
        grids = [grid for _, grid in patches]
        tokens = [h * w // self.image_cfg.merge_size ** 2 for h, w in grids]
        ids = self.tokenizer.ids([prompt_text(prompt, len(images), self.plus)])[0]
        return expand_image_pads(ids, self.pad, tokens), [rows for rows, _ in patches], grids

    @torch.no_grad()
    def encode(self, prompt: str, images: list[np.ndarray]) -> torch.Tensor:
        """(tokens, dim) embedding of one instruction with its pictures ((H, W, 3) uint8, already at the size
        the pipeline gives the processor), picture tokens included."""
        ids, rows, grids = self.inputs(prompt, images)
        ids = torch.tensor([ids], device=self.device)
        features, positions = None, None
        if images:
            features = self.features(rows, grids)
            merge = self.image_cfg.merge_size
            positions = mrope_positions(ids[0] == self.pad, [(h // merge, w // merge) for h, w in grids])
        return self.model(ids, images=features, positions=positions)[0, DROP:]

    def features(self, rows: list[np.ndarray], grids: list[tuple[int, int]]) -> torch.Tensor:
        """The vision tower's tokens for these pictures. The last pictures' are kept: the negative prompt is
        encoded with the same pictures, and the tower is the costly part of a short prompt."""
        last = self.last
        if not (last and last[1] == grids and all(np.array_equal(a, b) for a, b in zip(last[0], rows))):
            tokens = self.vision(torch.from_numpy(np.concatenate(rows)).to(self.device, self.dtype), grids)
            self.last = last = (rows, grids, tokens)
        return last[2]
