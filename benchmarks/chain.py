"""A 3-edit `qimg chain` vs three separate `qimg inpaint` processes, and the drift of the kept region.

    python benchmarks/chain.py                        # tiny random checkpoint, 256x256, 4 steps, 3 reps
    python benchmarks/chain.py --model /path/to/Qwen-Image --size 1024x1024 --steps 20 --reps 1

Times, as whole processes (what a shell user waits for), with the same three rectangles, prompts, steps
and seed, interleaved (chain, separate, rerun, ...; common.timed), medians of --reps:
  chain     one `qimg chain` process, --no-cache: the model loads once, one VAE encode and one decode
  separate  three `qimg inpaint` processes, --no-cache, each on the previous output: three loads, encodes
            and decodes
  rerun     `qimg chain` again after changing the last edit's prompt (a new one each repetition), with a
            cache the first chain filled: only edit 3 runs
and reports, for the chain's and the separate commands' final images, how many pixels outside all three
rectangles differ from the original and by how much at most (both must be 0: each composites over the
original), and the mean difference between the two results inside the rectangles (they differ: the chain
never re-encodes the earlier edits). On the tiny checkpoint the times are mostly process start-up and
model loading, which is exactly what the chain saves; it judges no image quality.
"""

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import build_tiny_model, machine, timed
from PIL import Image
from skimage import data

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red lantern", "a neon sign", "a vending machine"]


def rects(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Three disjoint rectangles (x, y, w, h), each an eighth of the width and height, spread over the image."""
    w, h = width // 8, height // 8
    return [(width // 8, height // 8, w, h), (width // 2, height // 3, w, h), (width // 4, 2 * height // 3, w, h)]


def qimg(*args) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "qimg", *map(str, args)], check=True, env=env, capture_output=True)


def chain_file(path: Path, boxes, steps: int, seed: int, last_prompt: str) -> Path:
    lines = [f"seed: {seed}", f"steps: {steps}", "edits:"]
    for (x, y, w, h), prompt in zip(boxes, PROMPTS[:2] + [last_prompt]):
        lines.append(f'  - inpaint: {{rect: "{x},{y},{w},{h}", prompt: "{prompt}"}}')
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder [default: the tests' tiny random checkpoint]")
    parser.add_argument("--size", default="256x256", help="image WxH (skimage astronaut, resized)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0, help="untimed rounds first")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qimg-chain-bench-") as folder:
        run(args, Path(folder))


def run(args, tmp: Path) -> None:
    model = Path(args.model) if args.model else build_tiny_model(tmp / "tiny")
    width, height = (int(v) for v in args.size.split("x"))
    photo = tmp / "photo.png"
    Image.fromarray(data.astronaut()).resize((width, height), Image.LANCZOS).save(photo)
    boxes = rects(width, height)
    common = ["-m", model, "--device", args.device]
    first = chain_file(tmp / "chain.yaml", boxes, args.steps, 7, PROMPTS[2])
    cache = tmp / "cache"
    qimg("chain", photo, first, "-o", tmp / "warm.png", "--cache-dir", cache, *common)  # fills the cache
    reruns = itertools.count()

    def separate():
        source = photo
        for i, ((x, y, w, h), prompt) in enumerate(zip(boxes, PROMPTS)):
            out = tmp / f"separate-{i}.png"
            qimg("inpaint", source, "-p", prompt, "--rect", f"{x},{y},{w},{h}", "--steps", args.steps,
                 "--seed", 7, "-o", out, "--no-cache", "--overwrite", *common)
            source = out

    def rerun():
        changed = chain_file(tmp / "changed.yaml", boxes, args.steps, 7, f"a street lamp, take {next(reruns)}")
        qimg("chain", photo, changed, "-o", tmp / "rerun.png", "--cache-dir", cache, "--overwrite", *common)

    times = timed({
        "chain": lambda: qimg("chain", photo, first, "-o", tmp / "chain.png", "--no-cache", "--overwrite", *common),
        "separate": separate,
        "rerun": rerun,
    }, args.reps, args.warmup)

    base = times["separate"]
    print(machine())
    print(f"{args.size}, {args.steps} steps, 3 edits, {args.reps} reps, model {model.name}, device {args.device}")
    print(f"{'run':<10}{'median s':>10}{'vs separate':>13}")
    for name, seconds in times.items():
        print(f"{name:<10}{seconds:>10.2f}{seconds / base:>12.2f}x")

    original = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    inside = np.zeros(original.shape[:2], bool)
    for x, y, w, h in boxes:
        inside[y : y + h, x : x + w] = True
    results = {"chain": tmp / "chain.png", "separate": tmp / "separate-2.png"}
    print(f"\n{'result':<10}{'kept px changed':>17}{'kept max |d|':>14}")
    finals = {}
    for name, path in results.items():
        finals[name] = np.asarray(Image.open(path).convert("RGB")).astype(int)
        diff = np.abs(finals[name] - original)[~inside]
        print(f"{name:<10}{int((diff.max(axis=-1) > 0).sum()):>17}{int(diff.max()):>14}")
    apart = np.abs(finals["chain"] - finals["separate"])[inside].mean()
    print(f"mean |chain - separate| inside the rectangles: {apart:.2f}")


if __name__ == "__main__":
    main()
