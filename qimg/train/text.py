"""The built-in model's text side in training: its tokenizer recipe (shapes_tokenizer), token embeddings of unit
scale (spread_embeddings), a trained text encoder moved to a new tokenizer (retokenize), and prompts run through
the encoder as the engine does (Prompts). train.py trains the encoder through the MMDiT with these."""

import copy
from collections import Counter

import torch

from qimg.model.text import DROP, TEMPLATE, pad_batch
from qimg.train.checkpoint import special_ids, train_tokenizer
from qimg.train.shapes import words


class Prompts:
    """Tokenises prompts (memoised: captions repeat) and runs the text encoder as the engine does."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer, self.model = tokenizer, encoder.model
        self.ids: dict[str, list[int]] = {}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        for p in prompts:
            if p not in self.ids:
                self.ids[p] = self.tokenizer(TEMPLATE.format(p)).input_ids
        longest = max(len(self.ids[p]) for p in prompts)
        ids = torch.tensor([self.ids[p] + [0] * (longest - len(self.ids[p])) for p in prompts])
        mask = torch.tensor([[1] * len(self.ids[p]) + [0] * (longest - len(self.ids[p])) for p in prompts])
        hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return pad_batch([h[m.bool()][DROP:] for h, m in zip(hidden, mask)])



def spread_embeddings(encoder, seed: int) -> None:
    """Token embeddings of unit scale. At transformers' init (std 0.02) the residual stream of a small
    randomly initialised encoder is dominated by what all tokens share (the hidden states of "red" and
    "green" end up at cosine 0.96), so the MMDiT sees nearly the same text for every prompt and learns
    to ignore it; with unit-scale embeddings each word stays recognisable from the first step."""
    torch.manual_seed(seed)
    with torch.no_grad():
        encoder.model.language_model.embed_tokens.weight.normal_(0.0, 1.0)


def shapes_tokenizer(captions: list[str]):
    """The byte-level BPE over `captions`, with merges learned within words
    (shapes.words). Learned over whole captions, Chinese merged into phrases: every colour-shape pair
    ("红色圆形") and even whole captions ("绿色背景上的白色三角形") became single tokens, each to be
    learned apart from the rest, and Chinese prompts drew the named shape less often than English.
    The space before a Chinese word in a mixed caption stays a token of its own ("a 红色" is a, Ġ,
    红色), so Chinese and mixed captions share their word tokens. The merges run out (about 500 tokens)
    before the vocabulary limit."""
    return train_tokenizer([piece for c in captions for piece in words(c)], vocab_size=1000)


def retokenize(encoder, old, new, captions: list[str]):
    """A trained text encoder moved from tokenizer `old` to `new`: the same config and layers (but the
    vocabulary size and special token ids), and each token of `new` takes the embedding of whichever
    of its forms in `old` ("红色" or "Ġ红色") `old` used most often on `captions` in the prompt
    template; a token `old` never used is drawn at the trained embeddings' scale. The LM head, which
    text-to-image never runs, is left as initialised."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    before = encoder.get_input_embeddings().weight.detach()
    used = Counter(i for c in captions for i in old(TEMPLATE.format(c))["input_ids"])
    table = torch.randn(len(new), before.shape[1]) * before.std()
    old_ids = old.get_vocab()
    for token, i in new.get_vocab().items():
        forms = [old_ids[f] for f in (token, "Ġ" + token) if f in old_ids]
        best = max(forms, key=used.__getitem__, default=None)
        if best is not None and used[best]:
            table[i] = before[best]

    config = copy.deepcopy(encoder.config)
    text_ids, ids = special_ids(new)
    for key, value in (text_ids | {"vocab_size": len(new)}).items():
        setattr(config.text_config, key, value)
    for key, value in ids.items():
        setattr(config, key, value)
    moved = Qwen2_5_VLForConditionalGeneration(config).to(before.dtype)
    vocabulary = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    state = {k: v for k, v in encoder.state_dict().items() if k not in vocabulary}
    result = moved.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == vocabulary, result
    with torch.no_grad():
        moved.get_input_embeddings().weight.copy_(table)
    return moved
