"""End to end: `qimg generate` as a process (start to PNG written) vs a diffusers script doing the same job.

    PYTHONPATH=. python benchmarks/end_to_end.py                          # tiny random checkpoint
    PYTHONPATH=. python benchmarks/end_to_end.py --model /path/to/model --size 512x512 --steps 20
    PYTHONPATH=. python benchmarks/end_to_end.py --edit                   # `qimg edit`, tiny Edit-2511 checkpoint
    PYTHONPATH=. python benchmarks/end_to_end.py --family 2.1             # tiny Qwen-Image-2.1, vs QwenImage21Pipeline

With --edit the job is `qimg edit` of a --size picture at an edit area of its own size, against
QwenImageEditPlusPipeline assembled as the tests assemble it (no torchvision: tests/tiny_edit_checkpoint.py).
With --family 2.1 the job is `qimg generate` on the tiny Qwen-Image-2.1 folder (tests/qwen21_folder.py), no
guidance (the model's default), against QwenImage21Pipeline assembled the same way; qimg runs a second time with
--no-kv-cache, so the prefix KV cache's saving shows (the difference is transformer time: the rest is the same).

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
from common import build_tiny_model, machine, tests_on_path, timed
from PIL import Image

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
EDIT_SCRIPT = """
import sys, torch
from PIL import Image
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus
from tiny_edit_checkpoint import reference_edit_pipeline
folder, prompt, width, height, steps, cfg, seed, picture, out = sys.argv[1:]
area = int(width) * int(height)
dimensions = plus.calculate_dimensions
plus.calculate_dimensions = lambda a, ratio: dimensions(area if a == 1024 * 1024 else a, ratio)
pipe = reference_edit_pipeline(__import__("pathlib").Path(folder))
image = pipe(image=[Image.open(picture).convert("RGB")], prompt=prompt, negative_prompt=" ",
             true_cfg_scale=float(cfg), num_inference_steps=int(steps), height=int(height), width=int(width),
             generator=torch.Generator("cpu").manual_seed(int(seed))).images[0]
image.save(out)
"""
QWEN21_SCRIPT = """
import sys, torch
from pathlib import Path
from qwen21_folder import reference_pipeline
folder, prompt, width, height, steps, cfg, seed, out = sys.argv[1:]
pipe = reference_pipeline(Path(folder))
image = pipe(prompt, width=int(width), height=int(height), num_inference_steps=int(steps),
             generator=torch.Generator("cpu").manual_seed(int(seed))).images[0]
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
    p.add_argument("--edit", action="store_true", help="qimg edit vs QwenImageEditPlusPipeline (tiny 2511 model)")
    p.add_argument("--family", choices=("qwen-image", "2.1"), default="qwen-image",
                   help="2.1: qimg generate vs QwenImage21Pipeline on the tiny Qwen-Image-2.1 folder")
    args = p.parse_args()
    qwen21 = args.family == "2.1"
    if qwen21:
        args.cfg = 1.0  # the model's default: no guidance
    width, height = args.size.split("x")
    tests = str(ROOT / "tests")
    path = os.pathsep.join([str(ROOT), tests, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build = build_tiny_qwen21 if qwen21 else build_tiny_edit_model if args.edit else build_tiny_model
        model = args.model or build(tmp / "tiny")
        outs = {"qimg": tmp / "qimg.png", "diffusers": tmp / "diffusers.png", "qimg --no-kv-cache": tmp / "nokv.png"}
        job = [str(model), args.prompt, width, height, str(args.steps), str(args.cfg), "0"]
        qimg = ["--steps", job[4], "--cfg", job[5], "--seed", job[6], "--device", "cpu", "--dtype", "float32",
                "-o", str(outs["qimg"]), "--no-cache", "--no-worker"]  # every rep encodes its prompts, as diffusers
        if args.edit:
            picture = tmp / "picture.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (int(height), int(width), 3), np.uint8)).save(
                picture)
            commands = {
                "qimg": [sys.executable, "-m", "qimg", "edit", str(picture), "-m", job[0], "-p", job[1],
                         "--edit-area", str(int(width) * int(height)), *qimg],
                "diffusers": [sys.executable, "-c", EDIT_SCRIPT, *job, str(picture), str(outs["diffusers"])],
            }
        else:
            commands = {
                "qimg": [sys.executable, "-m", "qimg", "generate", "-m", job[0], "-p", job[1], "--size", args.size,
                         *qimg],
                "diffusers": [sys.executable, "-c", QWEN21_SCRIPT if qwen21 else DIFFUSERS_SCRIPT, *job,
                              str(outs["diffusers"])],
            }
            if qwen21:
                commands["qimg --no-kv-cache"] = [*commands["qimg"][:-3], str(outs["qimg --no-kv-cache"]),
                                                  "--no-cache", "--no-worker", "--no-kv-cache", "--quiet"]
                commands["qimg"].append("--quiet")

        def runner(name):
            def run():
                outs[name].unlink(missing_ok=True)
                subprocess.run(commands[name], env=env, check=True, capture_output=True)
            return run

        seconds = timed({name: runner(name) for name in commands}, args.reps, warmup=1)
        a, b = (np.asarray(Image.open(outs[n]).convert("RGBA")).astype(int) for n in ("qimg", "diffusers"))
        print(machine())
        print(f"{'qimg edit' if args.edit else 'qimg generate'}, model "
              f"{model if args.model else 'tiny random checkpoint'}, {args.size}, {args.steps} steps, "
              f"cfg {args.cfg}, CPU float32, median of {args.reps} interleaved\n")
        print(f"{'diffusers':>10} {'qimg':>10} {'ratio':>6}   max |pixel diff|")
        print(f"{seconds['diffusers']:>9.2f}s {seconds['qimg']:>9.2f}s {seconds['diffusers'] / seconds['qimg']:>5.2f}x"
              f"   {np.abs(a - b).max()}")
        if qwen21:
            print(f"\nqimg --no-kv-cache {seconds['qimg --no-kv-cache']:.2f}s: the prefix KV cache saves "
                  f"{seconds['qimg --no-kv-cache'] - seconds['qimg']:.2f}s of transformer time per image")


def build_tiny_qwen21(folder: Path) -> Path:
    tests_on_path()
    from qwen21_folder import build_qwen21_folders

    return build_qwen21_folders(folder)["base"]


def build_tiny_edit_model(folder: Path) -> Path:
    tests_on_path()
    from tiny_edit_checkpoint import build_tiny_edit_checkpoints

    return build_tiny_edit_checkpoints(folder)["2511"]


if __name__ == "__main__":
    main()
