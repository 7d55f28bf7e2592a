"""--preview on the built-in model: what one preview costs (the x0 estimate decoded by the VAE, then written as a
PNG by atomic replace) and what previews add to a run's wall time.

    PYTHONPATH=. python benchmarks/preview.py [--sizes 128 256 512] [--steps 24] [--reps 3] [--threads 1]

Per size: the run without previews; with the default interval (about a tenth of the steps) and with a
preview every step (runs interleaved, medians); one preview's cost split into the decode and the write.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from common import machine, timed

from qimg.engine.engine import Engine
from qimg.engine.request import Sampling
from qimg.jobs.previews import PreviewFile
from qimg.weights.folders import builtin_model

PROMPT = "a red circle above a blue square"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    engine = Engine(builtin_model(), "cpu", "float32")
    folder = Path(tempfile.mkdtemp())
    print(f"{'size':>9} {'run':>8} {'default':>16} {'every step':>16} {'one preview':>12} {'decode':>8} {'write':>8}")
    for side in args.sizes:
        hooks = {}

        def run(every=None, name=None):
            hook = None if name is None else PreviewFile(folder / f"{name}.png", every)
            engine.generate(Sampling(PROMPT, " ", args.steps, 4.0, 7), side, side, preview=hook)
            hooks[name] = hook

        t = timed({"none": run, "default": lambda: run(None, "default"), "every": lambda: run(1, "every")},
                  args.reps)
        latent = engine.generate_latent(Sampling(PROMPT, " ", args.steps, 4.0, 7), side, side)
        image = engine.decode(latent)
        write = PreviewFile(folder / "write.png", None)
        parts = timed({"decode": lambda: engine.decode(latent), "write": lambda: write.write(lambda: image, "1/2")},
                      args.reps)
        every = hooks["every"]
        print(f"{side:>4}x{side:<4} {t['none']:7.2f}s "
              f"{t['default'] / t['none']:6.2f}x ({hooks['default'].count:2d} pv) "
              f"{t['every'] / t['none']:6.2f}x ({every.count:2d} pv) "
              f"{every.seconds / every.count * 1000:9.0f} ms {parts['decode'] * 1000:6.0f}ms "
              f"{parts['write'] * 1000:6.0f}ms")


if __name__ == "__main__":
    main()
