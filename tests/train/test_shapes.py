"""The synthetic dataset and the evaluation's image reader, checked against each other.

The reader must recover what the generator drew (background, colour, position, shape) from the pixels
alone, or the evaluation of the built-in model would be measuring itself.
"""

import random
import re

import numpy as np
import pytest

from qimg.train.evaluate import analyse, dominant_color
from qimg.train.shapes import CHINESE_WORDS, COLORS, LANGUAGES, POSITIONS, SHAPES, caption, render, sample_scene, words


def test_same_seed_same_data():
    def draw(seed):
        rng = random.Random(seed)
        scenes = [sample_scene(rng) for _ in range(5)]
        return scenes, [render(s, rng) for s in scenes], [caption(s, rng, "mixed") for s in scenes]

    a, b, c = draw(3), draw(3), draw(4)
    assert a[0] == b[0] and a[2] == b[2] and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
    assert a[0] != c[0]


def test_colours_in_a_scene_differ():
    rng = random.Random(0)
    for _ in range(200):
        s = sample_scene(rng)
        colors = [s.background] + [t.color for t in s.things]
        assert len(set(colors)) == len(colors)
        assert len({t.position for t in s.things}) == len(s.things)


@pytest.mark.parametrize("language", LANGUAGES)
def test_captions_state_only_true_attributes(language):
    rng = random.Random(1)
    zh = {c: z for c, (_, z) in COLORS.items()} | SHAPES
    for _ in range(100):
        scene = sample_scene(rng)
        text = caption(scene, rng, language)
        named = [t for t in scene.things if t.color in text or zh[t.color] in text]
        for t in named:
            assert t.shape in text or zh[t.shape] in text
        with_background = "background" in text or "背景" in text
        # every object, unless the caption names one object alone (an inpainting prompt)
        assert len(named) == (len(scene.things) if with_background else 1), text
        others = [c for c in COLORS if c not in {scene.background, *(t.color for t in scene.things)}]
        assert not any(re.search(rf"\b{c}\b", text) or zh[c] in text for c in others), text
        if language == "en":
            assert not re.search(r"[\u4e00-\u9fff]", text)
        if language == "zh":
            assert not re.search(r"[a-z]", text)
        if language == "mixed":
            assert re.search(r"[\u4e00-\u9fff]", text) and re.search(r"[a-z]", text), text
        assert not re.search(rf"({'|'.join(COLORS)})({'|'.join(SHAPES)})", text), text  # "red circle", not "redcircle"


def test_caption_forms():
    rng = random.Random(2)
    scene = sample_scene(rng, objects=1)
    t = scene.things[0]
    article = "an" if scene.background == "orange" else "a"
    english = f"on the {t.position} of {article} {scene.background} background"
    assert caption(scene, rng, "en", "position").endswith(english)
    chinese = f"{COLORS[scene.background][1]}背景上{POSITIONS[t.position][1]}的"
    assert caption(scene, rng, "zh", "position").startswith(chinese)
    assert "background" not in caption(scene, rng, "en", "object")
    pair = sample_scene(rng, objects=2)
    named = {caption(pair, rng, "en", "object") for _ in range(20)}
    assert {next(t for t in pair.things if t.color in text) for text in named} == set(pair.things), named


def test_reader_recovers_rendered_scenes():
    rng = random.Random(5)
    for _ in range(60):
        scene = sample_scene(rng, objects=1)
        got, want = analyse(render(scene, rng)), scene.things[0]
        assert got == {"background": scene.background, "color": want.color, "position": want.position,
                       "shape": want.shape}, scene


def test_dominant_colour_ignores_background():
    rng = random.Random(6)
    scene = sample_scene(rng, objects=1)
    image = render(scene, rng)
    assert dominant_color(image, (0, 0, 128, 128)) == scene.things[0].color
    assert dominant_color(np.full_like(image, 40), (0, 0, 128, 128)) is None


def test_words_cut_chinese_at_word_boundaries():
    assert words("蓝色背景上上方的小红色正方形和黑色圆形") == [
        "蓝色", "背景", "上", "上方", "的", "小", "红色", "正方形", "和", "黑色", "圆形"]
    assert words("a 红色 circle on a blue background") == ["a ", "红色", " circle on a blue background"]
    rng = random.Random(5)
    for _ in range(200):
        text = caption(sample_scene(rng), rng, rng.choice(LANGUAGES))
        pieces = words(text)
        assert "".join(pieces) == text
        assert all(p in CHINESE_WORDS or not re.search(r"[\u4e00-\u9fff]", p) for p in pieces), pieces
