"""What the latent and prompt caches save, and what they do to multi-round edits.

    python benchmarks/caches.py                          # tiny random checkpoint
    python benchmarks/caches.py --model /path/to/Qwen-Image --device cuda --steps 20 --size 1024x768

Part 1, cost: each run is a fresh `qimg` process (so its peak RSS is its own), cache on vs --no-cache:
  prompt   a second `generate` with the same prompt: on = the embeddings come from the cache, the text
           encoder (and transformers) is never loaded.
  edit     a second `inpaint` of an earlier output with a new prompt: on = its latent comes from the cache,
           the VAE encoder is never loaded (the text encoder still runs: only the latent cache is at work).
  both     the same with the prompt of the earlier edit: neither encoder is loaded.
Reported: median over --repeat of the command's own seconds, the process wall time (imports included) and
peak RSS, and on/off ratios.

Part 2, drift: five inpaint rounds over one photo, each round editing the previous round's output, once with
the cache (each round's latent carried to the next) and once without (each round re-encodes its input):
  outside  max |output - original| where no round's mask reached: must be 0 in both modes
  near     mean |output - original| within --near px around the masks edited so far (the seam neighbourhood)
  whole    mean |output - original| over the whole image
  fidelity PSNR of decode(latent the round starts from) against the round's input, over the pixels the round
           keeps: how faithfully the model's view matches the picture it must keep (re-encoding costs a VAE
           round trip every round; the cache keeps earlier rounds' own latents)
With the tiny random-weight model the numbers exercise the code paths; absolute drift needs a trained model.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import build_tiny_model, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, resource, sys, time
t = time.perf_counter()
from qimg.cli.app import run
code = run(sys.argv[1:])
sys.stderr.write(json.dumps({"code": code, "wall": time.perf_counter() - t,
                             "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}) + "\\n")
"""
ROUNDS = [(24, 20, 48, 40), (120, 30, 40, 56), (60, 100, 72, 32), (150, 110, 40, 40), (40, 40, 48, 24)]  # x, y, w, h


def qimg(args: list, env: dict) -> dict:
    """One qimg process: its JSON report plus wall seconds and peak RSS (MB)."""
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env,
                            cwd=ROOT)
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    if stats["code"] != 0:
        raise SystemExit(f"qimg {' '.join(map(str, args))} failed:\n{result.stderr}")
    return {**json.loads(result.stdout), **stats}


def cost(args, folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "QIMG_CACHE_DIR": str(folder / "cache")}
    # --overwrite: the on and off runs of a case write the same file
    common = ["-m", args.model, "--steps", args.steps, "--device", args.device, "--seed", "1", "--json", "--overwrite"]
    w, h = args.size.split("x")
    gen = ["generate", "-p", "a lantern on a night street", "--size", args.size, *common]
    base = folder / "base.png"
    edit = ["inpaint", base, "--rect", f"{int(w) // 4},{int(h) // 4},{int(w) // 3},{int(h) // 3}", *common]
    qimg([*gen, "-o", folder / "g0.png"], env)  # fills the prompt cache
    qimg([*edit[:1], folder / "g0.png", *edit[2:], "-p", "a red lantern", "-o", base], env)  # its latent is cached
    cases = {
        "prompt": lambda i, flag: qimg([*gen, "-o", folder / f"g-{flag}-{i}.png", *flag], env),
        "edit": lambda i, flag: qimg([*edit, "-p", f"a lantern number {i}{flag}", "-o", folder / f"e-{i}.png",
                                      *flag], env),
        "both": lambda i, flag: qimg([*edit, "-p", "a red lantern", "-o", folder / f"b-{i}.png", *flag], env),
    }
    print(machine())
    print(f"cost: {args.repeat} runs each, {args.size}, {args.steps} steps, {args.threads} thread(s), "
          f"median seconds (command / process) and peak RSS")
    print(f"{'case':8} {'cache':>6} {'cmd s':>8} {'proc s':>8} {'RSS MB':>8}   latent/prompt cache")
    for name, one in cases.items():
        rows = {}
        for flag in ([], ["--no-cache"]):
            runs = [one(i, flag) for i in range(args.repeat)]
            rows[bool(flag)] = [statistics.median(r[k] for r in runs) for k in ("seconds", "wall", "rss_mb")]
            print(f"{name:8} {'off' if flag else 'on':>6} {rows[bool(flag)][0]:8.2f} {rows[bool(flag)][1]:8.2f} "
                  f"{rows[bool(flag)][2]:8.0f}   {runs[-1]['latent_cache']}/{runs[-1]['prompt_cache']}")
        on, off = rows[False], rows[True]
        print(f"{name:8} {'on/off':>6} {on[0] / off[0]:8.2f} {on[1] / off[1]:8.2f} {on[2] / off[2]:8.2f}")


def drift(args, folder: Path, photo: np.ndarray) -> None:
    import torch

    from qimg.cache import Store
    from qimg.engine.engine import Engine
    from qimg.engine.request import Sampling
    from qimg.masks import feather, grow, latent_mask, pad_to_multiple, rect_mask

    torch.set_num_threads(args.threads)
    h, w = photo.shape[:2]
    print(f"\ndrift: {len(ROUNDS)} inpaint rounds on a {w}x{h} photo, strength {args.strength}, feather "
          f"{args.feather}, {args.steps} steps")
    print(f"{'mode':6} {'round':>5} {'outside':>8} {'near':>8} {'whole':>8} {'fidelity dB':>12}  latent cache")
    finals = {}
    for mode in ("cache", "none"):
        engine = Engine(Path(args.model), args.device, "auto", Store(folder / f"drift-{mode}") if mode == "cache"
                        else None)
        image, touched = photo, np.zeros((h, w), bool)
        for k, (x, y, rw, rh) in enumerate(ROUNDS):
            mask = feather(rect_mask([(x, y, x + rw, y + rh)], w, h), args.feather)
            work = pad_to_multiple(image, None)[0]
            z0, status = engine.input_latent(image, work, True)  # what this round will start from
            keep = latent_mask(pad_to_multiple(mask, None)[0], 8) == 0
            seen = engine.decode(z0).astype(np.float32)[:h, :w]
            kept = np.kron(keep, np.ones((8, 8), bool))[:h, :w]
            mse = np.mean((seen[kept] - image[kept].astype(np.float32)) ** 2)
            sampling = Sampling("a red lantern", " ", args.steps, 4.0, 100 + k, args.strength)
            result = engine.inpaint(image, mask, sampling)
            if mode == "cache":
                engine.cache_latent(result.image, result.latent)
            assert np.array_equal(result.image[mask == 0], image[mask == 0]), "changed a pixel outside the mask"
            touched |= mask > 0
            near = grow(touched.astype(np.float32), args.near) > 0
            diff = np.abs(result.image.astype(np.int16) - photo.astype(np.int16))
            print(f"{mode:6} {k + 1:5d} {diff[~touched].max():8d} {diff[near].mean():8.2f} {diff.mean():8.2f} "
                  f"{10 * np.log10(255**2 / mse):12.2f}  {status}")
            image = result.image
        finals[mode] = image
    diff = np.abs(finals['cache'].astype(np.int16) - finals['none']).mean()
    print(f"final image, cache vs none: mean |diff| {diff:.2f}"
          " (the rounds differ where they edit: their starting latents differ)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder [default: a tiny random checkpoint built in a temp folder]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default="256x192", help="generate size in part 1")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--feather", type=int, default=8)
    parser.add_argument("--near", type=int, default=16)
    args = parser.parse_args()
    from skimage import data

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        args.model = args.model or str(build_tiny_model(folder / "tiny"))
        photo = np.ascontiguousarray(data.astronaut()[40:240, 100:300])  # 200x200: padded to 208
        cost(args, folder)
        drift(args, folder, photo)


if __name__ == "__main__":
    main()
