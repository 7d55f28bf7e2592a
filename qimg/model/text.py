"""Prompt encoding with Qwen2.5-VL, exactly as the reference pipeline does it.

The prompt is wrapped in Qwen-Image's system template, run through the language model, and the last
hidden state of the real (unpadded) tokens is kept, minus the template's first 34 positions.
"""

import warnings
from pathlib import Path

import torch

from ..errors import QimgError, QimgWarning

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP = 34  # the reference's prompt_template_encode_start_idx: the system prefix, in Qwen2 tokens
MAX_TOKENS = 1024  # tokenizer truncation after the prefix (the pipeline's tokenizer_max_length)
MAX_EMBED = 512  # embeddings kept per prompt (the pipeline's default max_sequence_length)


class TextEncoder:
    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device):
        from safetensors import SafetensorError
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.utils import logging

        logging.set_verbosity_error()  # qimg reports its own progress and errors
        logging.disable_progress_bar()

        for part in ("tokenizer", "text_encoder"):
            if not (folder / part).is_dir():  # else transformers takes the path for a Hub repo id and goes online
                raise QimgError(f"{folder / part} is missing: the model folder is incomplete")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
            model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                folder / "text_encoder", dtype=dtype, use_safetensors=True, output_loading_info=True,
                local_files_only=True,
            )
        except (OSError, ValueError, SafetensorError) as e:
            raise QimgError(f"cannot load the text encoder from {folder}: {str(e).splitlines()[0]}") from None
        prefix = len(self.tokenizer(TEMPLATE.split("{}")[0]).input_ids)
        if prefix != DROP:  # a tokenizer folder missing its vocabulary loads as an empty tokenizer
            raise QimgError(f"{folder / 'tokenizer'} is not Qwen-Image's tokenizer: it reads the prompt template's "
                            f"prefix as {prefix} tokens, not {DROP} (files missing or from another model?)")
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if problems:
            kind, keys = next(iter(problems.items()))
            raise QimgError(f"{folder / 'text_encoder'}: {kind.replace('_', ' ')}: {', '.join(map(str, list(keys)[:5]))}")
        # Only the language model's hidden states are used: skip the vocabulary projection.
        self.model = model.model.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One (tokens, dim) tensor per prompt."""
        for prompt, ids in zip(prompts, self.tokenizer([TEMPLATE.format(p) for p in prompts]).input_ids):
            if len(ids) - DROP > MAX_EMBED:
                start = prompt[:24] + ("..." if len(prompt) > 24 else "")
                warnings.warn(f"prompt {start!r} is {len(ids) - DROP} tokens long; the model reads the first "
                              f"{MAX_EMBED} (its template's closing tokens included) and ignores the rest",
                              QimgWarning, stacklevel=2)
        tokens = self.tokenizer(
            [TEMPLATE.format(p) for p in prompts], max_length=MAX_TOKENS + DROP, padding=True, truncation=True,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        keep = tokens.attention_mask.bool()
        return [h[m][DROP:][:MAX_EMBED] for h, m in zip(hidden, keep)]


def pad_batch(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack prompts of different lengths with zero padding; the mask is None when nothing is padded."""
    longest = max(e.shape[0] for e in embeds)
    x = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[0])) for e in embeds])
    if all(e.shape[0] == longest for e in embeds):
        return x, None
    mask = torch.stack([torch.arange(longest, device=x.device) < e.shape[0] for e in embeds])
    return x, mask
