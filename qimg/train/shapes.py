"""The synthetic scene dataset the built-in model learns from: flat shapes on flat backgrounds.

Everything is deterministic from a seed. A scene is a background colour and one or two objects
(colour, shape, position, size); `render` draws it, `caption` describes it in English, Chinese or a
mix of both, in the caption forms the model promises to understand.
"""

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {  # name: (reference RGB, Chinese)
    "red": ((230, 30, 30), "红色"),
    "green": ((30, 180, 60), "绿色"),
    "blue": ((30, 70, 230), "蓝色"),
    "yellow": ((240, 220, 30), "黄色"),
    "white": ((245, 245, 245), "白色"),
    "black": ((15, 15, 15), "黑色"),
    "orange": ((245, 140, 20), "橙色"),
    "purple": ((140, 50, 200), "紫色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
POSITIONS = {  # name: ((x, y) centre as a fraction of the image, Chinese)
    "left": ((0.27, 0.5), "左边"),
    "right": ((0.73, 0.5), "右边"),
    "top": ((0.5, 0.27), "上方"),
    "bottom": ((0.5, 0.73), "下方"),
    "center": ((0.5, 0.5), "中间"),
}
SIZES = {"small": (0.11, "小"), "large": (0.19, "大")}  # half-extent as a fraction of the short side
PAIRS = [("left", "right"), ("top", "bottom")]  # where two objects go
LANGUAGES = ("en", "zh", "mixed")
CHINESE_WORDS = (*(zh for _, zh in COLORS.values()), *SHAPES.values(), *(zh for _, zh in POSITIONS.values()),
                 *(zh for _, zh in SIZES.values()), "背景", "上", "的", "和")


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...]


def sample_scene(rng: random.Random, objects: int | None = None) -> Scene:
    """A random scene with one or two objects whose colours differ from each other and the background."""
    n = objects or rng.choice((1, 1, 2))
    background, *colors = rng.sample(list(COLORS), n + 1)
    positions = [rng.choice(list(POSITIONS))] if n == 1 else list(rng.choice(PAIRS))
    rng.shuffle(positions)
    things = tuple(
        Thing(c, rng.choice(list(SHAPES)), p, rng.choice(list(SIZES))) for c, p in zip(colors, positions)
    )
    return Scene(background, things)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, ...]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon (or ellipse bounding box, for circles) of a shape centred at (cx, cy), half-extent r."""
    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        s = 0.9 * r  # a little smaller, so a square and a circle of one size cover similar areas
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]


def render(scene: Scene, rng: random.Random, size: tuple[int, int] = (128, 128), aa: int = 2) -> np.ndarray:
    """(H, W, 3) uint8: the scene drawn with colour and placement jitter, anti-aliased."""
    w, h = size
    image = Image.new("RGB", (w * aa, h * aa), _jitter(COLORS[scene.background][0], rng))
    draw = ImageDraw.Draw(image)
    short = min(w, h) * aa
    for thing in scene.things:
        (fx, fy), _ = POSITIONS[thing.position]
        cx = (fx + rng.uniform(-0.04, 0.04)) * w * aa
        cy = (fy + rng.uniform(-0.04, 0.04)) * h * aa
        r = SIZES[thing.size][0] * short * rng.uniform(0.9, 1.1)
        fill = _jitter(COLORS[thing.color][0], rng)
        points = shape_points(thing.shape, cx, cy, r)
        if thing.shape == "circle":
            draw.ellipse(points, fill=fill)
        else:
            draw.polygon(points, fill=fill)
    return np.asarray(image.resize((w, h), Image.Resampling.BOX))


def _translator(names: list[str], rng: random.Random, language: str):
    """Colour/shape name -> the word used in the caption. Mixed captions put each word in either
    language, and at least one in each language."""
    if language == "mixed":
        lang = {n: rng.choice(("en", "zh")) for n in names}
        if len(set(lang.values())) == 1:
            only = next(iter(lang.values()))
            lang[rng.choice(names)] = "zh" if only == "en" else "en"
    else:
        lang = dict.fromkeys(names, language)
    chinese = {c: zh for c, (_, zh) in COLORS.items()} | SHAPES
    return lambda name: name if lang[name] == "en" else chinese[name]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: random.Random, language: str, form: str | None = None) -> str:
    """Describe a scene. form: "plain", "position" (one object only) or "object" (one object, no
    background: of a two-object scene it names either one, as an inpainting prompt names only what goes
    inside the mask while the rest of the picture is given).

    Unstated attributes (position, size) are whatever the scene has, so the model learns that they are
    free; stated ones are always true of the scene.
    """
    forms = ("plain", "position", "position", "object") if len(scene.things) == 1 else ("plain", "object")
    form = form or rng.choice(forms)
    structure = language if language != "mixed" else rng.choice(("en", "zh"))
    first = rng.choice(scene.things) if form == "object" else scene.things[0]
    things = (first,) if form in ("position", "object") else scene.things
    names = [t.color for t in things] + [t.shape for t in things] + ([] if form == "object" else [scene.background])
    word = _translator(names, rng, language)
    bg = word(scene.background) if form != "object" else None
    with_size = rng.random() < 0.3

    if structure == "en":
        def obj(t):
            words = f"{t.size + ' ' if with_size else ''}{word(t.color)} {word(t.shape)}"
            return f"{article(words)} {words}"
        if form == "object":
            return obj(first)
        if form == "position":
            return f"{obj(first)} on the {first.position} of {article(bg)} {bg} background"
        return f"{' and '.join(obj(t) for t in things)} on {article(bg)} {bg} background"

    def obj(t):
        color, shape = word(t.color), word(t.shape)
        space = " " if (color + shape).isascii() else ""  # "red circle", not "redcircle"
        return f"{SIZES[t.size][1] if with_size else ''}{color}{space}{shape}"
    if form == "object":
        return obj(first)
    if form == "position":
        return f"{bg}背景上{POSITIONS[first.position][1]}的{obj(first)}"
    return f"{bg}背景上的{'和'.join(obj(t) for t in things)}"


_CHINESE_WORD = re.compile(f"({'|'.join(sorted(CHINESE_WORDS, key=len, reverse=True))})")  # 上方 before 上


def words(text: str) -> list[str]:
    """A caption cut before and after each Chinese word (English runs stay whole), as the tokenizer
    learns its merges: Chinese has no spaces to stop BPE merging across words."""
    return [piece for piece in _CHINESE_WORD.split(text) if piece]


def nearest_color(rgb) -> str:
    """The colour name whose reference RGB is closest to `rgb`."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLORS, key=lambda c: float(np.sum((np.asarray(COLORS[c][0]) - rgb) ** 2)))
