"""Prompt encoding with Qwen2.5-VL's language model, exactly as the reference pipeline does it.

The prompt is wrapped in Qwen-Image's system template, run through the language model, and the last
hidden state of the real (unpadded) tokens is kept, minus the template's first 34 positions. The tokenizer and
the language model come in built: weights/text_encoder.py reads them from a model folder.
"""

import warnings

import torch

from qimg.errors import QimgWarning
from qimg.model.qwen2 import Qwen2Model
from qimg.model.tokenizer import Tokenizer

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP = 34  # the reference's prompt_template_encode_start_idx: the system prefix, in Qwen2 tokens
MAX_TOKENS = 1024  # tokenizer truncation after the prefix (the pipeline's tokenizer_max_length)
MAX_EMBED = 512  # embeddings kept per prompt (the pipeline's default max_sequence_length)


class TextEncoder:
    def __init__(self, tokenizer: Tokenizer, model: Qwen2Model, device: torch.device):
        self.tokenizer, self.model, self.device = tokenizer, model, device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One (tokens, dim) tensor per prompt."""
        all_ids = self.tokenizer.ids([TEMPLATE.format(p) for p in prompts])
        for prompt, ids in zip(prompts, all_ids):
            if len(ids) - DROP > MAX_EMBED:
                start = prompt[:24] + ("..." if len(prompt) > 24 else "")
                warnings.warn(f"prompt {start!r} is {len(ids) - DROP} tokens long; the model reads the first "
                              f"{MAX_EMBED} (its template's closing tokens included) and ignores the rest",
                              QimgWarning, stacklevel=2)
        ids, mask = self.tokenizer.pad([i[:MAX_TOKENS + DROP] for i in all_ids])
        hidden = self.model(ids.to(self.device), mask.to(self.device))
        return [h[m][DROP:][:MAX_EMBED] for h, m in zip(hidden, mask.bool().to(self.device))]


def pad_batch(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack prompts of different lengths with zero padding; the mask is None when nothing is padded."""
    longest = max(e.shape[0] for e in embeds)
    x = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[0])) for e in embeds])
    if all(e.shape[0] == longest for e in embeds):
        return x, None
    mask = torch.stack([torch.arange(longest, device=x.device) < e.shape[0] for e in embeds])
    return x, mask
