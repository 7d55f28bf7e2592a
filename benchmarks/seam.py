"""Seam error of inpainting with the attention mask off vs on, on three real photos.

    python benchmarks/seam.py                                  # tiny random checkpoint: exercises the path only
    python benchmarks/seam.py --model /path/to/Qwen-Image --device cuda --steps 30

For each photo (skimage astronaut, chelsea, coffee): a centred rectangular hole (--hole of each side), feathered
by --feather px, inpainted with --seeds seeds, attn_mask=False and attn_mask=True with the same seed.

Metrics, measured on each of the rectangle's four sides and averaged over pixels:
  seam   pixels in a band of --band px just inside the hole are paired, by reflection across the transition zone,
         with pixels in a band of --band px just outside the feather (where the output equals the input);
         mean |a - b| over the pairs and channels. Reported as output minus the same number on the input
         ("excess"): 0 means the edit meets its surroundings as smoothly as the photo itself did.
  grad   mean absolute finite difference along the boundary normal, across the whole transition
         (band inside .. feather .. band outside), output minus input.
Lower is better for both. With the tiny random-weight model the numbers only exercise the code path: the model
paints noise, so they say nothing about which setting makes better seams. Decide on a trained model (--model).
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import build_tiny_model, machine  # noqa: E402

from qimg.engine.engine import Engine  # noqa: E402
from qimg.engine.request import Sampling  # noqa: E402
from qimg.masks import feather, rect_mask  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee")


def photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3])


def centred_rect(width: int, height: int, frac: float) -> tuple[int, int, int, int]:
    w, h = round(width * frac), round(height * frac)
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def side_strips(img: np.ndarray, rect, gap: int, band: int):
    """For each side of rect: (inside, outside, across) float arrays, oriented so axis 0 runs along the outward
    normal. inside[i] is i px inside the edge, outside[i] is gap + i px outside it (i < band), and across
    covers band px inside .. gap + band px outside, ordered from inside to outside."""
    x0, y0, x1, y1 = rect
    a = img.astype(np.float32)
    out = []
    # top: outward is -y
    out.append(a[y0 - gap - band:y0 + band, x0:x1][::-1])
    # bottom: outward is +y
    out.append(a[y1 - band:y1 + gap + band, x0:x1])
    # left: outward is -x; transpose so axis 0 is x
    out.append(a[y0:y1, x0 - gap - band:x0 + band].transpose(1, 0, 2)[::-1])
    # right
    out.append(a[y0:y1, x1 - band:x1 + gap + band].transpose(1, 0, 2))
    strips = []
    for s in out:  # s[0:band] inside (s[band-1] is the last pixel in the hole), s[band+gap:] outside
        inside = s[:band][::-1]  # inside[i]: i px inside the edge
        outside = s[band + gap:]  # outside[i]: gap + i px outside
        strips.append((inside, outside, s))
    return strips


def seam_metrics(img: np.ndarray, rect, gap: int, band: int) -> tuple[float, float]:
    seam_sum = seam_n = grad_sum = grad_n = 0.0
    for inside, outside, across in side_strips(img, rect, gap, band):
        d = np.abs(inside - outside)
        seam_sum += d.sum()
        seam_n += d.size
        g = np.abs(np.diff(across, axis=0))
        grad_sum += g.sum()
        grad_n += g.size
    return seam_sum / seam_n, grad_sum / grad_n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model folder (default: build the tiny random checkpoint in a temp dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--photos", nargs="+", default=list(PHOTOS), choices=PHOTOS)
    p.add_argument("--hole", type=float, default=0.3, help="hole side as a fraction of each image side (default 0.3)")
    p.add_argument("--feather", type=int, default=8)
    p.add_argument("--band", type=int, default=3, help="px measured on each side of the transition (default 3)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--prompt", default="a seamless continuation of the surrounding photo")
    p.add_argument("--negative-prompt", default=" ")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory()
        t = time.perf_counter()
        folder = build_tiny_model(Path(tmp.name) / "qwen-image")
        built = time.perf_counter() - t
    else:
        folder = args.model
    engine = Engine(folder, args.device, args.dtype)

    print(f"machine: {machine()}; device {engine.device}, dtype {str(engine.dtype).removeprefix('torch.')}")
    if tmp is not None:
        print(f"model: TINY RANDOM-WEIGHT checkpoint (built in {built:.1f} s). These numbers only exercise the code")
        print("       path; the model paints noise, so off-vs-on here decides nothing. Run again with --model on a")
        print("       trained Qwen-Image folder to decide.")
    else:
        print(f"model: {folder}")
    print(f"hole {args.hole:.0%} of each side, centred; feather {args.feather} px; band {args.band} px; "
          f"{args.seeds} seeds; {args.steps} steps; cfg {args.cfg}")
    print("seam/grad excess = output minus input (grey levels 0-255); lower is better\n")

    # Warm-up (not timed): loads the components so the first timed run does not pay for it.
    warm = photo(args.photos[0])
    wh, ww = warm.shape[:2]
    engine.inpaint(warm, rect_mask([centred_rect(ww, wh, args.hole)], ww, wh),
                   Sampling(args.prompt, args.negative_prompt, 1, args.cfg, 0))

    header = (f"{'photo':<10} {'size':>9} | {'in seam':>7} {'in grad':>7} | {'off seam+':>9} {'on seam+':>9} | "
              f"{'off grad+':>9} {'on grad+':>9} | {'off s':>6} {'on s':>6}")
    print(header)
    print("-" * len(header))
    total = {k: [] for k in ("off_seam", "on_seam", "off_grad", "on_grad", "off_t", "on_t")}
    for name in args.photos:
        img = photo(name)
        h, w = img.shape[:2]
        rect = centred_rect(w, h, args.hole)
        mask = feather(rect_mask([rect], w, h), args.feather)
        in_seam, in_grad = seam_metrics(img, rect, args.feather, args.band)
        row = {k: [] for k in total}
        for seed in range(args.seeds):
            for on in (False, True):  # interleaved so load drift hits both alike
                key = "on" if on else "off"
                t = time.perf_counter()
                sampling = Sampling(args.prompt, args.negative_prompt, args.steps, args.cfg, seed)
                edit = engine.inpaint(img, mask, sampling, attn_mask=on)
                row[f"{key}_t"].append(time.perf_counter() - t)
                seam, grad = seam_metrics(edit.image, rect, args.feather, args.band)
                row[f"{key}_seam"].append(seam - in_seam)
                row[f"{key}_grad"].append(grad - in_grad)
        m = {k: statistics.mean(v) for k, v in row.items()}
        for k, v in row.items():
            total[k].extend(v)
        print(f"{name:<10} {f'{w}x{h}':>9} | {in_seam:>7.2f} {in_grad:>7.2f} | {m['off_seam']:>+9.3f} "
              f"{m['on_seam']:>+9.3f} | {m['off_grad']:>+9.3f} {m['on_grad']:>+9.3f} | "
              f"{m['off_t']:>6.1f} {m['on_t']:>6.1f}")
    m = {k: statistics.mean(v) for k, v in total.items()}
    print("-" * len(header))
    print(f"{'overall':<10} {'':>9} | {'':>7} {'':>7} | {m['off_seam']:>+9.3f} {m['on_seam']:>+9.3f} | "
          f"{m['off_grad']:>+9.3f} {m['on_grad']:>+9.3f} | {m['off_t']:>6.1f} {m['on_t']:>6.1f}")
    spread = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in total.items()}
    print(f"\nper-run std dev: seam off {spread['off_seam']:.2f}, on {spread['on_seam']:.2f}; "
          f"grad off {spread['off_grad']:.2f}, on {spread['on_grad']:.2f}")
    for what in ("seam", "grad"):
        off, on = m[f"off_{what}"], m[f"on_{what}"]
        sd = max(spread[f"off_{what}"], spread[f"on_{what}"])
        lower = "off" if off < on else "on" if on < off else "tie"
        note = "  (difference < 0.01 grey levels: a tie)" if abs(off - on) < 0.01 else \
            "  (difference below the per-run std dev: not significant)" if abs(off - on) < sd else ""
        print(f"lower {what} excess: attn_mask {lower} ({off:+.3f} vs {on:+.3f}){note}")
    diffs = [abs(a - b) for a, b in zip(total["off_seam"], total["on_seam"])]
    print(f"paired |off - on| seam per seed: max {max(diffs):.3f}, mean {statistics.mean(diffs):.3f}")
    if tmp is not None:
        print("(tiny random model: the above only shows the path runs; it is not evidence for either setting)")
        tmp.cleanup()


if __name__ == "__main__":
    main()
