"""Loading a bfloat16 transformer checkpoint of >= 2 GB on CPU: peak memory and time, qimg vs diffusers.

    PYTHONPATH=. python benchmarks/loading.py                 # 3 real-width blocks, about 2.1 GB
    PYTHONPATH=. python benchmarks/loading.py --layers 4 --reps 3 --dir /big/tmp

Writes a random real-width (hidden 3072, 24 heads) Qwen-Image transformer with --layers blocks to a temporary
folder in the diffusers layout, then loads it in fresh processes, interleaved: qimg's loader vs diffusers'
QwenImageTransformer2DModel.from_pretrained, both to bfloat16 on CPU, then every weight is read once (a loader
may map the file and read it lazily; a forward would read it all). Reported per loader: median seconds,
and the peak resident memory the load added (VmHWM minus the resident size just before the load, so the
interpreter and torch do not count) as a ratio to the checkpoint's size on disk. Target for qimg: <= 1.15.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import machine

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, time, torch
from pathlib import Path
which, folder = sys.argv[1], Path(sys.argv[2])
if which == "qimg":
    from qimg.model.transformer import QwenImageTransformer, TransformerConfig
    from qimg.weights import load_module, read_config
    cfg = TransformerConfig.from_dict(read_config(folder))
    load = lambda: load_module(lambda: QwenImageTransformer(cfg), folder, torch.bfloat16, torch.device("cpu"))
else:
    from diffusers import QwenImageTransformer2DModel
    load = lambda: QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

before = status("VmRSS")
start = time.perf_counter()
model = load()
for p in model.parameters():  # both loaders may map the file lazily: make every weight resident, as a forward would
    p.amax()
seconds = time.perf_counter() - start
assert next(model.parameters()).dtype == torch.bfloat16
print(json.dumps({"seconds": seconds, "added": status("VmHWM") - before}))
"""


def write_checkpoint(folder: Path, layers: int) -> int:
    """A random bfloat16 checkpoint in diffusers' layout; returns the weight file's size in bytes."""
    from diffusers import QwenImageTransformer2DModel

    from qimg.model.transformer import QwenImageTransformer, TransformerConfig
    from safetensors.torch import save_file

    cfg = TransformerConfig(num_layers=layers)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in QwenImageTransformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    folder.mkdir(parents=True)
    save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    config = {"_class_name": QwenImageTransformer2DModel.__name__, **dataclasses.asdict(cfg)}
    (folder / "config.json").write_text(json.dumps(config))
    return (folder / "diffusion_pytorch_model.safetensors").stat().st_size


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where to write the temporary checkpoint")
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "transformer"
        size = write_checkpoint(folder, args.layers)
        runs = {"diffusers": [], "qimg": []}
        for _ in range(args.reps):
            for which in runs:
                out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder)], env=env, check=True,
                                     capture_output=True, text=True).stdout
                runs[which].append(json.loads(out.splitlines()[-1]))
    print(machine())
    print(f"checkpoint: {args.layers} real-width blocks, bfloat16, {size / 2**30:.2f} GiB, loaded to bfloat16 on CPU, "
          f"median of {args.reps} interleaved\n")
    print(f"{'loader':<10} {'seconds':>8} {'peak added':>11} {'/ size':>7}")
    for which, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        added = statistics.median(r["added"] for r in results)
        print(f"{which:<10} {seconds:>7.2f}s {added / 2**30:>8.2f} GiB {added / size:>6.2f}x")
    ratio = statistics.median(r["seconds"] for r in runs["diffusers"]) / statistics.median(r["seconds"] for r in runs["qimg"])
    print(f"\nload time ratio diffusers / qimg: {ratio:.2f}x")


if __name__ == "__main__":
    main()
