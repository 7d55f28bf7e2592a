"""Pieces of the built-in model's training: the shape contrast's caption pairs, the object tokens and
the tokenizer."""

import random
import re

import numpy as np
import torch

from qimg.train.checkpoint import text_encoder, train_tokenizer
from qimg.train.shapes import COLORS, LANGUAGES, SHAPES, caption, render, sample_scene, words
from qimg.train.text import Prompts, retokenize, shapes_tokenizer
from qimg.train.train import caption_pair, object_tokens, other_shapes, sample_caption, weighted

SHAPE_WORDS = re.compile("|".join(list(SHAPES) + list(SHAPES.values())))


def test_other_shapes_changes_only_shapes():
    rng = random.Random(0)
    for _ in range(50):
        scene = sample_scene(rng)
        other = other_shapes(scene, rng)
        assert other.background == scene.background
        for a, b in zip(scene.things, other.things, strict=True):
            assert (a.color, a.position, a.size) == (b.color, b.position, b.size) and a.shape != b.shape


def test_caption_pair_differs_only_in_shape_words():
    rng = random.Random(1)
    conditional = 0
    for _ in range(200):
        true, swapped = caption_pair(sample_scene(rng), rng)
        if true == " ":
            assert swapped == " "
            continue
        conditional += 1
        assert SHAPE_WORDS.sub("#", true) == SHAPE_WORDS.sub("#", swapped), (true, swapped)
        assert SHAPE_WORDS.findall(true) != SHAPE_WORDS.findall(swapped), (true, swapped)
    assert conditional > 150


def test_caption_pair_keeps_the_true_captions():
    """The contrast must not change what the model is trained on: the true captions are the ones
    sample_caption alone would give for the same scenes and seed."""
    scenes = [sample_scene(random.Random(i)) for i in range(40)]
    a, b = random.Random(2), random.Random(2)
    paired = [caption_pair(s, a)[0] for s in scenes]
    alone = []
    for s in scenes:
        alone.append(sample_caption(s, b))
        other_shapes(s, b)  # caption_pair draws the other shapes from the same stream
    assert paired == alone


def test_object_tokens_cover_the_object():
    rng = random.Random(3)
    scenes = [sample_scene(rng, objects=1) for _ in range(20)]
    images = np.stack([render(s, rng) for s in scenes])
    tokens = object_tokens(images).view(-1, 8, 8)
    for image, grid in zip(images, tokens):
        far = np.abs(image.astype(int) - image[0, 0]).sum(-1) > 60
        ys, xs = np.nonzero(far)
        want = np.zeros((8, 8), bool)
        want[ys // 16, xs // 16] = True
        assert np.array_equal(grid.numpy(), want)
        assert 2 <= grid.sum() <= 16  # a small or large shape spans a few of the 64 tokens
    flat = np.full((1, 128, 128, 3), COLORS["blue"][0], np.uint8)
    assert not object_tokens(flat).any()


def test_weighted_loss():
    errors = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    assert weighted(errors, torch.ones(1, 4)).item() == errors.mean().item()
    assert weighted(errors, torch.tensor([[0.0, 0.0, 1.0, 1.0]])).item() == 4.5


def captions(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [caption(sample_scene(rng), rng, lang) for _ in range(n) for lang in LANGUAGES]


def crossings(tokenizer, text: str) -> list[str]:
    """The tokens of `text` that span more than one of its words."""
    bounds = np.cumsum([len(w) for w in words(text)])
    spans = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    return [text[a:b] for a, b in spans if any(a < x < b for x in bounds)]


def test_tokens_stay_within_words():
    """A BPE learned over whole captions merges Chinese phrases into single tokens ("红色圆形", even
    whole captions); shapes_tokenizer's tokens never span two words, in Chinese or mixed captions."""
    new = shapes_tokenizer(captions(0, 600))
    held_out = captions(1, 100)
    assert not [c for text in held_out if (c := crossings(new, text))]
    whole = train_tokenizer(captions(0, 600), vocab_size=1000)
    assert sum(bool(crossings(whole, text)) for text in held_out) > 50  # the check can fail


def test_retokenize_keeps_what_both_tokenizers_share():
    torch.manual_seed(0)
    old = train_tokenizer(captions(0, 300), vocab_size=1000)  # merges across Chinese words
    encoder = text_encoder(old, 64, layers=1)
    new = shapes_tokenizer(captions(1, 300))
    moved = retokenize(encoder, old, new, captions(2, 300))

    english = ["a red circle on the left of a blue background", "a small green square on a white background"]
    assert [old.tokenize(e) for e in english] == [new.tokenize(e) for e in english]
    assert old(english)["input_ids"] != new(english)["input_ids"]  # the same tokens under other ids
    with torch.no_grad():
        assert torch.equal(Prompts(old, encoder)(english)[0], Prompts(new, moved)(english)[0])
    # "红色" alone was a rare fragment of the old tokenizer's phrases; mixed captions used " 红色"
    embed, old_embed = moved.get_input_embeddings().weight, encoder.get_input_embeddings().weight
    ids = new.get_vocab()
    assert torch.equal(embed[ids["çº¢èī²"]], old_embed[old.get_vocab()["Ġçº¢èī²"]])
    assert moved.config.image_token_id == ids["<|image_pad|>"] != encoder.config.image_token_id
    assert moved.config.text_config.eos_token_id == ids["<|im_end|>"]
    assert moved.config.text_config.rope_parameters == encoder.config.text_config.rope_parameters
