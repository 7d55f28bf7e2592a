"""End to end: `qimg generate` as a process (start to PNG written) vs a diffusers script doing the same job.

    PYTHONPATH=. python benchmarks/end_to_end.py                          # tiny random checkpoint
    PYTHONPATH=. python benchmarks/end_to_end.py --model /path/to/model --size 512x512 --steps 20

Both are fresh Python processes on the same model folder, same prompt, size, steps, true CFG and seed, on CPU
in float32; each pays its imports, model loading, prompt encoding, sampling, decoding and the PNG write.
Repetitions are interleaved and medians reported; ratio = diffusers time / qimg time. The two PNGs are also
compared, so a fast wrong answer would show.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import build_tiny_model, machine, timed

ROOT = Path(__file__).resolve().parent.parent
DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import QwenImagePipeline
folder, prompt, width, height, steps, cfg, seed, out = sys.argv[1:]
pipe = QwenImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt, negative_prompt=" ", true_cfg_scale=float(cfg), width=int(width), height=int(height),
             num_inference_steps=int(steps), generator=torch.Generator("cpu").manual_seed(int(seed))).images[0]
image.save(out)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model folder (default: build the tiny test checkpoint)")
    p.add_argument("--prompt", default="a red lantern on a night street, 夜晚的街道")
    p.add_argument("--size", default="128x128")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    width, height = args.size.split("x")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or build_tiny_model(tmp / "tiny")
        outs = {"qimg": tmp / "qimg.png", "diffusers": tmp / "diffusers.png"}
        job = [str(model), args.prompt, width, height, str(args.steps), str(args.cfg), "0"]
        commands = {
            "qimg": [sys.executable, "-m", "qimg", "generate", "-m", job[0], "-p", job[1], "--size", args.size,
                     "--steps", job[4], "--cfg", job[5], "--seed", job[6], "--device", "cpu", "--dtype", "float32",
                     "-o", str(outs["qimg"]), "--no-cache"],  # every rep encodes its prompts, as diffusers does
            "diffusers": [sys.executable, "-c", DIFFUSERS_SCRIPT, *job, str(outs["diffusers"])],
        }

        def runner(name):
            def run():
                outs[name].unlink(missing_ok=True)
                subprocess.run(commands[name], env=env, check=True, capture_output=True)
            return run

        seconds = timed({name: runner(name) for name in commands}, args.reps, warmup=1)
        a, b = (np.asarray(Image.open(outs[n]).convert("RGB")).astype(int) for n in ("qimg", "diffusers"))
        print(machine())
        print(f"model {model if args.model else 'tiny random checkpoint'}, {args.size}, {args.steps} steps, "
              f"cfg {args.cfg}, CPU float32, median of {args.reps} interleaved\n")
        print(f"{'diffusers':>10} {'qimg':>10} {'ratio':>6}   max |pixel diff|")
        print(f"{seconds['diffusers']:>9.2f}s {seconds['qimg']:>9.2f}s {seconds['diffusers'] / seconds['qimg']:>5.2f}x"
              f"   {np.abs(a - b).max()}")


if __name__ == "__main__":
    main()
