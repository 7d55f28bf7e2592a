"""Startup: what a shell user pays before any model work, and what each path imports.

    PYTHONPATH=. python benchmarks/startup.py --reps 5

Rows (each a fresh process, interleaved, median): `python -c pass` (the floor), `qimg --help`, importing
torch, importing qimg's engine, and for comparison diffusers' QwenImagePipeline and transformers' Qwen2.5-VL
model class (what prompt encoding cost before qimg had its own). The last column lists the heavy packages
each one loaded; `qimg --help` must load none of them.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common import machine, timed

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "diffusers", "tokenizers", "safetensors", "numpy", "PIL")
REPORT = f"import sys; print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
CASES = {
    "python -c pass": "pass",
    "qimg --help": "from qimg.cli.app import run; run(['--help'])",
    "import torch": "import torch",
    "import qimg.engine.engine": "import qimg.engine.engine",
    "diffusers QwenImagePipeline": "from diffusers import QwenImagePipeline",
    "transformers Qwen2.5-VL class": "from transformers import Qwen2_5_VLForConditionalGeneration",
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def runner(code):
        return lambda: subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)

    seconds = timed({name: runner(code) for name, code in CASES.items()}, args.reps, warmup=1)
    print(machine())
    print(f"fresh processes, median of {args.reps} interleaved\n")
    print(f"{'':<30} {'seconds':>8}   heavy modules loaded")
    for name, code in CASES.items():
        loaded = subprocess.run([sys.executable, "-c", f"{code}\n{REPORT}"], env=env, check=True, capture_output=True,
                                text=True).stderr.strip().splitlines()[-1:] or ["-"]
        print(f"{name:<30} {seconds[name]:>7.2f}s   {loaded[0] or '-'}")


if __name__ == "__main__":
    main()
