"""Qwen-Image-2.1's prompt text, as its reference pipeline (diffusers' QwenImage21Pipeline) writes it.

A raw template string, not the chat template: the system text, the prompt as the user's turn and, with pictures,
`<image1><|vision_start|><|image_pad|><|vision_end|>` then ` <imageN>...` for each further picture, before the
prompt. An empty prompt is read as " " (Qwen has no BOS token: an empty turn leaves the encoder nothing to read).
The leading positions dropped from the encoder's output are the system message's tokens, counted by tokenizing
the message as the chat template renders it, never hard-coded. PromptEncoder21 runs it through the Qwen3-VL text
encoder (qwen3vl.py, qwen3vl_vision.py) with the pictures; weights/qwen21.py builds it from a model folder.
"""

import numpy as np
import torch
from PIL import Image

from qimg.model.instruct_text import IMAGE_PAD, expand_image_pads
from qimg.model.qwen3vl_image import preprocess
from qimg.model.qwen3vl_vision import Qwen3VLEncoder
from qimg.model.tokenizer import Tokenizer
from qimg.model.vl_image import ImageConfig

SYSTEM = "Comprehend and analyze the provided prompt."
SYSTEM_MESSAGE = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"  # the chat template's rendering of the system turn
TEMPLATE = SYSTEM_MESSAGE + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"  # <|image_pad|> expands to the picture's vision tokens
MAX_PICTURES = 10  # what 2.1 takes: Picture 1..10


def picture_marks(pictures: int) -> str:
    """`<image1>...` for each picture, the later ones after a space."""
    return " ".join(f"<image{i}>{PICTURE}" for i in range(1, pictures + 1))


def prompt_text(prompt: str, pictures: int = 0) -> str:
    """The text the reference's processor gets for one prompt with `pictures` pictures, before <|image_pad|> is
    expanded; it is also what a cached embedding is keyed by."""
    return TEMPLATE.format(picture_marks(pictures) + (prompt or " "))


def drop_count(token_ids) -> int:
    """How many leading positions of the encoder's output are dropped: the tokens of the system message.
    token_ids: a text -> its token ids (the model's tokenizer)."""
    return len(token_ids(SYSTEM_MESSAGE))


class PromptEncoder21:
    """One prompt and its pictures through Qwen3-VL as the reference's `encode_prompt` does: the template text
    tokenized, each <|image_pad|> expanded to its picture's merged vision tokens, the last decoder layer's output
    before the final norm, minus the system message's positions. One prompt a call, so nothing is padded (the
    reference encodes the negative prompt in a call of its own too)."""

    def __init__(self, tokenizer: Tokenizer, encoder: Qwen3VLEncoder, image_cfg: ImageConfig, dtype: torch.dtype,
                 device: torch.device):
        self.tokenizer, self.encoder, self.image_cfg = tokenizer, encoder, image_cfg
        self.dtype, self.device = dtype, device
        self.pad = tokenizer.bpe.token_to_id(IMAGE_PAD)
        self.drop = drop_count(lambda text: tokenizer.ids([text])[0])

    def inputs(self, prompt: str, pictures: list[np.ndarray]) -> tuple[list[int], list[np.ndarray], list[tuple]]:
        """The token ids with every <|image_pad|> expanded, each picture's patch rows, its grid in patches.
        pictures: (H, W, 4) uint8 RGBA at the size the pipeline gives the processor (composited over white here,
        for the vision tower alone)."""
        patches = [preprocess(Image.fromarray(p, "RGBA"), self.image_cfg) for p in pictures]
        grids = [grid for _, grid in patches]
        tokens = [h * w // self.image_cfg.merge_size ** 2 for h, w in grids]
        ids = self.tokenizer.ids([prompt_text(prompt, len(pictures))])[0]
        return expand_image_pads(ids, self.pad, tokens), [rows for rows, _ in patches], grids

    @torch.no_grad()
    def encode(self, prompt: str, pictures: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, hidden) embedding of one prompt with its pictures and the (tokens,) bool mask of the picture
        slots in it (the transformer's img_mask), both without the system message's positions."""
        ids, rows, grids = self.inputs(prompt, pictures)
        ids = torch.tensor([ids], device=self.device)
        rows = torch.from_numpy(np.concatenate(rows)).to(self.device, self.dtype) if rows else None
        hidden = self.encoder(ids, None, rows, grids)[0]
        return hidden[self.drop:], (ids[0] == self.pad)[self.drop:]
