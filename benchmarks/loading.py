"""Loading a bfloat16 transformer checkpoint of >= 2 GB on CPU: peak memory and time, qimg vs diffusers, and
qimg with a rank-64 LoRA fused at load.

    PYTHONPATH=. python benchmarks/loading.py                 # 3 real-width blocks, about 2.1 GB
    PYTHONPATH=. python benchmarks/loading.py --layers 4 --reps 3 --dir /big/tmp

Writes a random real-width (hidden 3072, 24 heads) Qwen-Image transformer with --layers blocks to a temporary
folder in the diffusers layout, then loads it in fresh processes, interleaved: qimg's loader vs diffusers'
QwenImageTransformer2DModel.from_pretrained, both to bfloat16 on CPU, then every weight is read once (a loader
may map the file and read it lazily; a forward would read it all). Reported per loader: median seconds,
and the peak resident memory the load added (VmHWM minus the resident size just before the load, so the
interpreter and torch do not count) as a ratio to the checkpoint's size on disk (with the LoRA: the checkpoint's
plus the LoRA file's). Target for qimg, with or without the LoRA: <= 1.15. The LoRA (bfloat16, alpha 32) targets
every linear layer, in the kohya layout.
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
if which.startswith("qimg"):
    from qimg.weights.adapters import apply_adapters, targets
    from qimg.weights.lora import LoraSpec, load as load_lora
    from qimg.model.transformer import QwenImageTransformer, TransformerConfig
    from qimg.weights.folders import load_module, read_config
    cfg = TransformerConfig.from_dict(read_config(folder))

    def load():
        model = load_module(lambda: QwenImageTransformer(cfg), folder, torch.bfloat16, torch.device("cpu"))
        if which == "qimg+lora":  # as the engine does: read and map the file, fuse it
            apply_adapters(model, [load_lora(LoraSpec(folder.parent / "lora.safetensors"), targets(model)).adapters])
        return model
else:
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    def load():
        model = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
        if which == "diffusers+lora":  # the reference's way: peft adapters, fused, then unloaded
            QwenImagePipeline.load_lora_into_transformer(
                QwenImagePipeline.lora_state_dict(str(folder.parent / "lora.safetensors")), transformer=model)
            model.fuse_lora()
            model.unload_lora()
        return model

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
    from safetensors.torch import save_file

    from qimg.model.transformer import QwenImageTransformer, TransformerConfig

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


def write_lora(file: Path, layers: int, rank: int) -> int:
    """A random bfloat16 rank-`rank` kohya LoRA over every linear layer; returns its size in bytes."""
    from safetensors.torch import save_file

    from qimg.model.transformer import QwenImageTransformer, TransformerConfig
    from qimg.weights.adapters import targets

    with torch.device("meta"):
        shapes = targets(QwenImageTransformer(TransformerConfig(num_layers=layers)))
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, (out, inp) in shapes.items():
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = (torch.randn(rank, inp, generator=g) * 0.01).to(torch.bfloat16)
        state[f"{key}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.01).to(torch.bfloat16)
        state[f"{key}.alpha"] = torch.tensor(32.0)
    save_file(state, file)
    return file.stat().st_size


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where to write the temporary checkpoint")
    p.add_argument("--rank", type=int, default=64, help="the LoRA's rank")
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "transformer"
        size = write_checkpoint(folder, args.layers)
        lora_size = write_lora(Path(tmp) / "lora.safetensors", args.layers, args.rank)
        runs = {"diffusers": [], "qimg": [], "diffusers+lora": [], "qimg+lora": []}
        for _ in range(args.reps):
            for which in runs:
                out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder)], env=env, check=True,
                                     capture_output=True, text=True).stdout
                runs[which].append(json.loads(out.splitlines()[-1]))
    print(machine())
    print(f"checkpoint: {args.layers} real-width blocks, bfloat16, {size / 2**30:.2f} GiB, loaded to bfloat16 on CPU, "
          f"median of {args.reps} interleaved; LoRA: rank {args.rank}, {lora_size / 2**20:.0f} MiB\n")
    print(f"{'loader':<14} {'seconds':>8} {'peak added':>11} {'/ size':>7}")
    for which, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        added = statistics.median(r["added"] for r in results)
        files = size + (lora_size if which.endswith("+lora") else 0)
        print(f"{which:<14} {seconds:>7.2f}s {added / 2**30:>8.2f} GiB {added / files:>6.2f}x")
    median = {which: statistics.median(r["seconds"] for r in runs[which]) for which in ("diffusers", "qimg")}
    ratio = median["diffusers"] / median["qimg"]
    print(f"\nload time ratio diffusers / qimg: {ratio:.2f}x")


if __name__ == "__main__":
    main()
