"""The crop path: inpainting a small hole in a large image vs in a crop that fits the working area.

    python benchmarks/large_inpaint.py                                 # 4000x3000, tiny random checkpoint
    python benchmarks/large_inpaint.py --size 2000x1500 --max-pixels 262144 --steps 4 --reps 3

Builds a large image (skimage astronaut upscaled with Pillow LANCZOS to --size) with a small rectangular hole
(--hole WxH px, feathered by --feather) and times engine.inpaint on
  (a) full    the whole large image: larger than max_pixels, so the engine crops the mask's box + context
  (b) crop    a square crop of the same image around the hole, side = the largest multiple of 16 whose square
              fits in max_pixels (1024 at the default 1024*1024), same mask region: the no-crop path
with the same steps, cfg and seed, interleaved (a, b, a, b, ...) after one untimed warm-up each, reporting medians.
Also reports each Edit's box and work_size, per-call peak RSS (Linux VmHWM, reset through /proc/self/clear_refs;
else the process's ru_maxrss), and checks that (a) is byte-identical to the input wherever the mask is 0.
"""

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import build_tiny_model, machine  # noqa: E402
from PIL import Image  # noqa: E402

from qimg.engine.engine import Engine  # noqa: E402
from qimg.engine.request import Sampling  # noqa: E402
from qimg.masks import feather, rect_mask  # noqa: E402


def parse_wh(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def peak_mib() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model folder (default: build the tiny random checkpoint in a temp dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--size", type=parse_wh, default=(4000, 3000), help="large image WxH (default 4000x3000)")
    p.add_argument("--hole", type=parse_wh, default=(200, 150), help="hole WxH px (default 200x150)")
    p.add_argument("--feather", type=int, default=8)
    p.add_argument("--max-pixels", type=int, default=1024 * 1024,
                   help="working area, written to qimg.json in a copy of the model folder (default 1048576)")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--attn-mask", action="store_true")
    p.add_argument("--prompt", default="a seamless continuation of the surrounding photo")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name) / "model"
    tiny = args.model is None
    if tiny:
        build_tiny_model(folder)
    else:  # a copy whose qimg.json we may overwrite; big weight files are symlinked, not copied
        shutil.copytree(args.model.resolve(), folder, copy_function=os.symlink,
                        ignore=shutil.ignore_patterns("qimg.json"))
    src = args.model / "qimg.json" if args.model else None
    d = json.loads(src.read_text()) if src and src.is_file() else {}
    (folder / "qimg.json").write_text(json.dumps({**d, "max_pixels": args.max_pixels}))
    engine = Engine(folder, args.device, args.dtype)
    assert engine.defaults.max_pixels == args.max_pixels

    W, H = args.size
    hw, hh = args.hole
    from skimage import data

    image = np.asarray(Image.fromarray(data.astronaut()).resize((W, H), Image.LANCZOS))
    hx0, hy0 = (W - hw) // 2, (H - hh) // 2
    hole = (hx0, hy0, hx0 + hw, hy0 + hh)
    mask = feather(rect_mask([hole], W, H), args.feather)

    side = math.isqrt(args.max_pixels) // 16 * 16
    side = min(side, W, H)
    cx0 = min(max(0, hx0 + hw // 2 - side // 2), W - side)
    cy0 = min(max(0, hy0 + hh // 2 - side // 2), H - side)
    crop_img = np.ascontiguousarray(image[cy0:cy0 + side, cx0:cx0 + side])
    crop_mask = np.ascontiguousarray(mask[cy0:cy0 + side, cx0:cx0 + side])
    assert crop_mask.sum() == mask.sum(), "the crop must contain the whole (feathered) mask"

    print(f"machine: {machine()}; device {engine.device}, dtype {str(engine.dtype).removeprefix('torch.')}")
    if tiny:
        print("model: TINY RANDOM-WEIGHT checkpoint: timings show the path's overhead shape, not real model cost")
    else:
        print(f"model: {args.model}")
    print(f"max_pixels {args.max_pixels} ({math.sqrt(args.max_pixels):.0f}^2); image {W}x{H}; hole {hw}x{hh} at "
          f"({hx0},{hy0}), feather {args.feather}; context {args.context}; steps {args.steps}; cfg {args.cfg}; "
          f"attn_mask {args.attn_mask}; reps {args.reps} interleaved, median")
    print(f"(b) crop: {side}x{side} at ({cx0},{cy0})\n")

    cases = {"a": (image, mask), "b": (crop_img, crop_mask)}
    names = {"a": f"(a) full {W}x{H}", "b": f"(b) crop {side}x{side}"}
    times = {k: [] for k in cases}
    peaks = {k: [] for k in cases}
    edits = {}
    can_reset = peak_reset()
    for i in range(args.reps + 1):  # round 0 is the untimed warm-up
        for k, (img, m) in cases.items():
            if can_reset:
                peak_reset()
            t = time.perf_counter()
            edit = engine.inpaint(img, m, Sampling(args.prompt, " ", args.steps, args.cfg, args.seed),
                                  attn_mask=args.attn_mask, context=args.context)
            dt = time.perf_counter() - t
            if i > 0:
                times[k].append(dt)
                peaks[k].append(peak_mib())
            edits[k] = edit

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'case':<22} {'median s':>9} {'min s':>7} {'max s':>7} | {'box (x0,y0,x1,y1)':>24} {'work':>9} | "
          f"{'peak RSS MiB':>12}")
    for k in cases:
        e = edits[k]
        print(f"{names[k]:<22} {med[k]:>9.2f} {min(times[k]):>7.2f} {max(times[k]):>7.2f} | {str(e.box):>24} "
              f"{'%dx%d' % tuple(e.work_size):>9} | {max(peaks[k]):>12.0f}")
    print(f"ratio a/b: {med['a'] / med['b']:.2f}")
    if not can_reset:
        print("(peak RSS is the process's running maximum: it cannot separate (a) from (b))")

    out = edits["a"].image
    outside = mask == 0
    same = bool(np.array_equal(out[outside], image[outside]))
    changed = int((out != image).any(-1).sum())
    box = edits["a"].box
    in_box = np.zeros_like(outside)
    in_box[box[1]:box[3], box[0]:box[2]] = True
    print(f"(a) outside the mask byte-identical to the input: {same} "
          f"({int(outside.sum())} px checked; {changed} px changed in all, all inside the mask: "
          f"{not (out != image).any(-1)[outside].any()}; box inside the image and covering the mask: "
          f"{bool(in_box[mask > 0].all())})")
    ob = edits["b"].image
    print(f"(b) outside the mask byte-identical to the input: "
          f"{bool(np.array_equal(ob[crop_mask == 0], crop_img[crop_mask == 0]))}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
