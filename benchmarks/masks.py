"""Masks from words: masks per second for a CLIPSeg the size of the default model (CIDAS/clipseg-rd64-refined:
ViT-B/16 vision, 512-wide text, reduce_dim 64, its 352x352 input) on 512x512 images, through qimg's provider
(processor, model, sigmoid, resize to the image) and the union and packing a cached mask takes.

    python benchmarks/masks.py                  # real-size config, random weights (none can be downloaded here)
    python benchmarks/masks.py --phrases 3      # three phrases a mask (the vision tower runs once)
    python benchmarks/masks.py --tiny --reps 3  # the tests' tiny model: the code path only
    python benchmarks/masks.py --device cuda --threads 8

Random weights cost what trained ones do: the same layers and shapes run. A first call (warm-up) is left out.
Each mask's wall time is printed with the process's CPU time and the load average: on a shared machine the
wall time says little alone. --threads defaults to 1: on a loaded 2-core VM, 2 torch threads triple the wall
time (the threads spin at each barrier waiting for a core).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, tests_on_path

from qimg import masks
from qimg.segment import providers
from qimg.segment.models import MaskModel


def real_size_clipseg(folder: Path) -> Path:
    """CLIPSegConfig's defaults are CLIPSeg's ViT-B/32, 512-wide text; rd64-refined is ViT-B/16 (patch 16) and
    adds these three."""
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessorPil

    tests_on_path()
    from segment_models import clip_tokenizer

    folder.mkdir(parents=True)
    tokenizer = clip_tokenizer(folder)
    torch.manual_seed(0)
    config = CLIPSegConfig(vision_config={"patch_size": 16}, reduce_dim=64, extract_layers=[3, 6, 9],
                           use_complex_transposed_convolution=True)
    model = CLIPSegForImageSegmentation(config).eval()
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M")
    model.save_pretrained(folder)
    images = ViTImageProcessorPil(size={"height": 352, "width": 352}, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    CLIPSegProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model instead of the real size")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--phrases", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: a shared CPU box)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            tests_on_path()
            from segment_models import build_clipseg

            folder = build_clipseg(Path(tmp) / "clipseg")
        else:
            folder = real_size_clipseg(Path(tmp) / "clipseg")
        started = time.perf_counter()
        seg = providers.load(MaskModel("clipseg", (folder,), "benchmark", "benchmark"), args.device)
        print(f"load: {time.perf_counter() - started:.2f} s")
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(args.reps + 1)]
        phrases = ["the sky", "a sofa", "a person", "a car"][: args.phrases]
        times, cpu, loads = [], [], []
        for image in images:
            started, used = time.perf_counter(), time.process_time()
            masks.pack(masks.union_above(seg.probabilities(image, phrases), 0.4))
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - used)
            loads.append(os.getloadavg()[0])
        per, used = float(np.median(times[1:])), float(np.median(cpu[1:]))
        print(f"512x512, {len(phrases)} phrase(s), {args.device}, {args.threads} thread(s): {per * 1000:.0f} ms a "
              f"mask wall, {used * 1000:.0f} ms CPU, {1 / per:.2f} masks/s (median of {args.reps}; load average "
              f"{min(loads[1:]):.1f}-{max(loads[1:]):.1f})")


if __name__ == "__main__":
    main()
