"""Qwen2's byte-level BPE tokenizer: a `tokenizers` pipeline with its pad token, cutting and padding token ids
as the reference pipeline does. weights/tokenizer.py builds it from a model folder's `tokenizer/` files."""

import torch

# transformers' Qwen2 PRETOKENIZE_REGEX: contractions, letter runs, single digits, punctuation, spaces.
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD = "<|endoftext|>"  # Qwen2Tokenizer's default pad token


class Tokenizer:
    def __init__(self, bpe, pad_id: int):
        """bpe: a `tokenizers.Tokenizer` that neither truncates nor pads; pad_id: the id padding is made of."""
        self.bpe, self.pad_id = bpe, pad_id

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, uncut."""
        return [e.ids for e in self.bpe.encode_batch(texts)]

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, N), cut at max_length and right-padded to the longest text."""
        return self.pad([i[:max_length] for i in self.ids(texts)])

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, N), right-padded to the longest."""
        n = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [self.pad_id] * (n - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])
        return input_ids, mask
