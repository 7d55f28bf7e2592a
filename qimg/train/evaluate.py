"""Prompt adherence of a shapes model, checked automatically on held-out captions.

    python -m qimg.train.evaluate [MODEL_FOLDER] [--per-language 30]

Each generated image is read back with plain pixel statistics: the background is the colour of the
image border, the object is the largest connected region of pixels nearer another colour, its colour the nearest
reference colour to its median, its position the nearest anchor to its centroid, and its shape follows from how
much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2). The same reader recovers
the generator's own scenes exactly (a test checks this), so it measures the model, not itself.
"""

import argparse
import random
from collections import deque
from pathlib import Path

import numpy as np

from qimg.engine.request import Sampling
from qimg.train.shapes import COLORS, LANGUAGES, POSITIONS, article, caption, nearest_color, sample_scene

MIN_AREA = 30  # pixels; smaller regions are noise


NAMES = list(COLORS)
REFERENCE = np.array([rgb for rgb, _ in COLORS.values()], dtype=np.float64)


def color_map(image: np.ndarray) -> np.ndarray:
    """(H, W) index into NAMES of each pixel's nearest reference colour."""
    d = ((image[..., None, :].astype(np.float64) - REFERENCE) ** 2).sum(-1)
    return d.argmin(-1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a bool (H, W) mask, as (N, 2) arrays of (y, x), largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    regions = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(np.array(pixels))
    return sorted(regions, key=len, reverse=True)


def background(image: np.ndarray) -> np.ndarray:
    """Median RGB of the 3-pixel border."""
    border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                             image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    return np.median(border, axis=0)


def classify_shape(region: np.ndarray) -> str:
    (y0, x0), (y1, x1) = region.min(axis=0), region.max(axis=0)
    fill = len(region) / ((y1 - y0 + 1) * (x1 - x0 + 1))
    return "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"


def nearest_position(yx: np.ndarray, size: tuple[int, int]) -> str:
    h, w = size
    y, x = yx
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0][0] * w - x) ** 2 + (POSITIONS[p][0][1] * h - y) ** 2)


def analyse(image: np.ndarray) -> dict:
    """{"background", and for the largest object "color", "position", "shape"} (None if no object)."""
    bg = nearest_color(background(image))
    regions = [r for r in components(color_map(image) != NAMES.index(bg)) if len(r) >= MIN_AREA]
    found = {"background": bg, "color": None, "position": None, "shape": None}
    if regions:
        r = regions[0]
        found.update(
            color=nearest_color(np.median(image[r[:, 0], r[:, 1]], axis=0)),
            position=nearest_position(r.mean(axis=0), image.shape[:2]),
            shape=classify_shape(r),
        )
    return found


def dominant_color(image: np.ndarray, box: tuple[int, int, int, int]) -> str | None:
    """The nearest reference colour of the pixels in box (x0, y0, x1, y1) far from the background."""
    x0, y0, x1, y1 = box
    counts = np.bincount(color_map(image[y0:y1, x0:x1]).ravel(), minlength=len(NAMES))
    counts[NAMES.index(nearest_color(background(image)))] = 0
    return NAMES[counts.argmax()] if counts.max() >= MIN_AREA else None


INPAINT_BOX = {"left": (72, 36, 124, 92), "right": (4, 36, 56, 92)}  # the half the object is not in


def evaluate(engine, per_language: int = 30, seed: int = 1000, steps: int | None = None, cfg: float | None = None):
    """Rates of correct attributes per language, plus the inpainting check; also returns every case."""
    d = engine.defaults
    steps, cfg = steps or d.steps, cfg or d.cfg
    rng = random.Random(seed)
    cases, table = [], {}
    for language in LANGUAGES:
        hits = {"background": 0, "color": 0, "position": 0, "all stated": 0, "shape": 0}
        for i in range(per_language):
            scene = sample_scene(rng, objects=1)
            form = "position" if i % 2 == 0 else "plain"
            prompt = caption(scene, rng, language, form)
            image = engine.generate(Sampling(prompt, d.negative_prompt, steps, cfg, seed + i), d.width, d.height).image
            got, want = analyse(image), scene.things[0]
            ok = {
                "background": got["background"] == scene.background,
                "color": got["color"] == want.color,
                "position": form != "position" or got["position"] == want.position,
                "shape": got["shape"] == want.shape,
            }
            ok["all stated"] = ok["background"] and ok["color"] and ok["position"]
            for k in hits:
                hits[k] += ok[k]
            cases.append({"language": language, "prompt": prompt, "found": got, "ok": ok})
        table[language] = {k: v / per_language for k, v in hits.items()}
    table["inpaint"] = {"color": _inpaint_rate(engine, rng, per_language, seed, steps, cfg, cases)}
    return table, cases


def _inpaint_rate(engine, rng, n, seed, steps, cfg, cases) -> float:
    d = engine.defaults
    hits = 0
    for i in range(n):
        scene = sample_scene(rng, objects=1)
        side = rng.choice(list(INPAINT_BOX))
        scene_prompt = caption(scene, rng, "en", "position").replace(scene.things[0].position, side, 1)
        sampling = Sampling(scene_prompt, d.negative_prompt, steps, cfg, seed + i)
        image = engine.generate(sampling, d.width, d.height).image
        color = rng.choice([c for c in COLORS if c not in (scene.background, scene.things[0].color)])
        x0, y0, x1, y1 = INPAINT_BOX[side]
        mask = np.zeros(image.shape[:2], np.float32)
        mask[y0:y1, x0:x1] = 1
        prompt = f"{article(color)} {color} triangle"
        edit = engine.inpaint(image, mask, Sampling(prompt, d.negative_prompt, steps, cfg, seed + i))
        got = dominant_color(edit.image, INPAINT_BOX[side])
        hits += got == color
        cases.append({"language": "inpaint", "prompt": f"{scene_prompt} + {prompt}", "found": got,
                      "ok": {"color": got == color}})
    return hits / n


def markdown(table: dict) -> str:
    columns = ["background", "color", "position", "all stated", "shape"]
    lines = ["| prompts | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for language, rates in table.items():
        lines.append(f"| {language} | " + " | ".join(f"{rates[c]:.0%}" if c in rates else "" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    from qimg.engine.engine import Engine
    from qimg.weights.folders import builtin_model

    parser = argparse.ArgumentParser(prog="python -m qimg.train.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", default=None, help="model folder [default: built-in]")
    parser.add_argument("--per-language", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None)
    args = parser.parse_args()
    engine = Engine(args.model or builtin_model(), "cpu", "float32")
    table, cases = evaluate(engine, args.per_language, args.seed, args.steps, args.cfg)
    for case in cases:
        if not all(case["ok"].values()):
            print("miss:", case["prompt"], "->", case["found"])
    print(markdown(table))


if __name__ == "__main__":
    main()
