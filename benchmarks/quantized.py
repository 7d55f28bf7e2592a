"""Packed transformer weights on CPU: peak memory while loading, and forward time, Q8_0 / Q4_K / fp8 vs bf16.

    PYTHONPATH=. python benchmarks/quantized.py                  # 3 real-width blocks, about 2.1 GB in bf16
    PYTHONPATH=. python benchmarks/quantized.py --layers 2 --reps 3 --dir /big/tmp

Writes a random real-width (hidden 3072, 24 heads) Qwen-Image transformer with --layers blocks as a bf16 folder,
then as one file each: GGUF Q8_0 (quantized by the gguf package), GGUF Q4_K (random blocks with small scales:
gguf has no K-quant quantizer; timing and memory do not depend on the values) and ComfyUI scaled fp8. Each is
loaded to bfloat16 in a fresh process with qimg's loader, kept packed (--no-dequantize). Reported:
the peak resident memory the load added (VmHWM minus the resident size before it) as a ratio to the file's size
(target <= 1.15: packed weights really stay packed), load seconds, and the seconds of one forward at 256 image
+ 64 text tokens in bfloat16, with each layer unpacked on the fly vs the weights unpacked once at load.
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
import torch
from common import machine
from loading import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads(int(sys.argv[3]))
folder, file = Path(sys.argv[1]), (Path(sys.argv[2]) if sys.argv[2] != "-" else None)
from qimg.model.transformer import TransformerConfig
from qimg.weights.transformer import Source, load_transformer
from qimg.weights.folders import read_config
cfg = TransformerConfig.from_dict(read_config(folder))

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

def forward(model):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 256, cfg.in_channels, generator=g, dtype=torch.bfloat16)
    txt = torch.randn(1, 64, cfg.joint_attention_dim, generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        model(img, txt, None, torch.tensor([0.5]), (16, 16))  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            model(img, txt, None, torch.tensor([0.5]), (16, 16))
            times.append(time.perf_counter() - start)
    return sorted(times)[1]

before = status("VmRSS")
start = time.perf_counter()
model = load_transformer(cfg, folder, Source(file, dequantize=False), torch.bfloat16, torch.device("cpu"))
for t in model.state_dict().values():  # every byte resident, as a forward would make it
    t.float().amax() if t.is_floating_point() else t.max()
seconds = time.perf_counter() - start
added = status("VmHWM") - before
packed = forward(model)
print(json.dumps({"seconds": seconds, "added": added, "forward": packed}))
"""
UNPACKED = """
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads(int(sys.argv[3]))
folder, file = Path(sys.argv[1]), Path(sys.argv[2])
from qimg.model.transformer import TransformerConfig
from qimg.weights.transformer import Source, load_transformer
from qimg.weights.folders import read_config
cfg = TransformerConfig.from_dict(read_config(folder))
model = load_transformer(cfg, folder, Source(file, dequantize=True), torch.bfloat16, torch.device("cpu"))
g = torch.Generator().manual_seed(0)
img = torch.randn(1, 256, cfg.in_channels, generator=g, dtype=torch.bfloat16)
txt = torch.randn(1, 64, cfg.joint_attention_dim, generator=g, dtype=torch.bfloat16)
with torch.no_grad():
    model(img, txt, None, torch.tensor([0.5]), (16, 16))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model(img, txt, None, torch.tensor([0.5]), (16, 16))
        times.append(time.perf_counter() - start)
print(json.dumps({"forward": sorted(times)[1]}))
"""


def write_files(folder: Path, out: Path) -> dict[str, Path]:
    """The folder's weights as Q8_0 and Q4_K GGUF (the in/out layers BF16, 1-D F32, as city96 writes them) and as
    legacy scaled fp8 safetensors (block weights fp8, the rest bf16)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from quant_files import pack

    from qimg.model.quant import quantize_fp8

    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    rng = np.random.default_rng(0)
    files = {}
    for kind in ("Q8_0", "Q4_K"):
        files[kind] = out / f"transformer-{kind}.gguf"
        writer = GGUFWriter(str(files[kind]), arch="qwen_image")
        writer.add_quantization_version(2)
        for name, t in state.items():
            block = name.startswith("transformer_blocks.") and t.ndim == 2
            qtype = kind if block else ("F32" if t.ndim == 1 else "BF16")
            w = t.float().numpy()
            data = pack(w, kind, rng) if block else quantize(w, GGMLQuantizationType[qtype])
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    fp8 = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for name, t in state.items():
        if name.startswith("transformer_blocks.") and t.ndim == 2:
            data, scale = quantize_fp8(t)
            fp8[name], fp8[name.removesuffix("weight") + "scale_weight"] = data.view(torch.float8_e4m3fn), scale
        else:
            fp8[name] = t
    files["fp8"] = out / "transformer-fp8.safetensors"
    save_file(fp8, files["fp8"])
    return files


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", type=Path, default=None, help="where to write the temporary files")
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "transformer"
        sizes = {"bf16": write_checkpoint(folder, args.layers)}
        files = write_files(folder, Path(tmp))
        sizes.update({k: f.stat().st_size for k, f in files.items()})
        runs = {k: [] for k in sizes}
        for _ in range(args.reps):
            for which in runs:
                file = str(files[which]) if which in files else "-"
                out = subprocess.run([sys.executable, "-c", CHILD, str(folder), file, str(args.threads)], env=env,
                                     check=True, capture_output=True, text=True).stdout
                runs[which].append(json.loads(out.splitlines()[-1]))
        unpacked = {}
        for which, file in files.items():
            out = subprocess.run([sys.executable, "-c", UNPACKED, str(folder), str(file), str(args.threads)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            unpacked[which] = json.loads(out.splitlines()[-1])["forward"]
    print(machine())
    print(f"{args.layers} real-width blocks on CPU, {args.threads} threads, median of {args.reps} fresh processes; "
          "forward: 256 image + 64 text tokens, bfloat16\n")
    print(f"{'weights':<8} {'file':>9} {'load':>7} {'peak added':>11} {'/ file':>7} {'forward':>8} "
          f"{'unpacked once':>14}")
    for which, results in runs.items():
        added = statistics.median(r["added"] for r in results)
        seconds = statistics.median(r["seconds"] for r in results)
        forward = statistics.median(r["forward"] for r in results)
        once = f"{unpacked[which]:.2f}s" if which in unpacked else "(dense)"
        print(f"{which:<8} {sizes[which] / 2**30:>5.2f} GiB {seconds:>6.2f}s {added / 2**30:>7.2f} GiB "
              f"{added / sizes[which]:>6.2f}x {forward:>7.2f}s {once:>14}")


if __name__ == "__main__":
    main()
