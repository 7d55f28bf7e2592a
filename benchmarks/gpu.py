"""The real-width transformer on a GPU: seconds per forward, TFLOP/s and fraction of the device's bf16 peak,
qimg (eager, --compile, --offload blocks, --devices cuda:0,cuda:1 when two GPUs are visible) vs diffusers in the
same run. Skipped when no CUDA device is present.

    PYTHONPATH=. python benchmarks/gpu.py                      # 60 blocks, 1024x1024, ~100 text tokens
    PYTHONPATH=. python benchmarks/gpu.py --layers 20 --reps 5 --peak-tflops 989

Random bfloat16 weights, built once on the GPU and shared by both implementations (qimg's module is assigned
diffusers' tensors), so 60 blocks need ~41 GB. Rows: one forward at batch 1; one true-CFG step (the reference
runs two passes, qimg one batch of 2); qimg with each block torch.compiled (compile time reported apart); and
qimg streaming its blocks from pinned CPU memory (--offload blocks). Outputs are compared with diffusers'.
With 2 or more GPUs, then the one-image modes (--cfg-parallel, --ulysses 2, --tp 2, and on 4 GPUs their
products) beside one GPU, each rank on its own GPU over NCCL: benchmarks/parallel.py at the same width, blocks
and size (its random weights are written to a temporary folder first: ~0.7 GB per block).

    PYTHONPATH=. python benchmarks/gpu.py --family 2.1          # Qwen-Image-2.1: 32 blocks x 4096, 1024x1024

`--family 2.1` times qimg's Qwen-Image-2.1 transformer at real width (7.1B parameters, ~14.2 GB in bf16) on a
request of --txt-tokens text tokens and --pictures condition pictures at --size: one forward without the prefix
key/value cache, the forward that fills it, and one that reads it (the target's tokens alone), the first and last
with the blocks streamed (--offload blocks) too, then what an image of --steps steps costs each way; the cached
and streamed outputs are compared with the plain one.
"""

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine, timed

from qimg.model.offload import BlockStream
from qimg.model.rope21 import build_layout
from qimg.model.split import place_split
from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.model.transformer21 import PrefixCache, QwenImage21Transformer, Transformer21Config

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense


def forward_flops(cfg: TransformerConfig, img: int, txt: int) -> float:
    """Matmul FLOPs of one batch-1 forward: projections and MLPs of both streams, attention, modulation."""
    d = cfg.dim
    per_block = 2 * (img + txt) * 12 * d * d + 4 * (img + txt) ** 2 * d + 2 * 2 * 6 * d * d
    ends = 2 * img * (cfg.in_channels + 4 * cfg.out_channels) * d + 2 * txt * cfg.joint_attention_dim * d
    return cfg.num_layers * per_block + ends


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("qwen-image", "2.1"), default="qwen-image")
    p.add_argument("--layers", type=int, default=None, help="blocks (default: the model's, 60 or 32)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--txt-tokens", type=int, default=100)
    p.add_argument("--pictures", type=int, default=1, help="2.1: condition pictures at --size (0: text to image)")
    p.add_argument("--steps", type=int, default=40, help="2.1: steps of the image the cache's saving is counted for")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: by name)")
    args = p.parse_args(argv)
    args.layers = args.layers or (32 if args.family == "2.1" else 60)
    return args


def main(argv=None):
    args = parse(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if args.family == "2.1":
        cfg = Transformer21Config(num_layers=args.layers)
        report21(cfg, transformer21_rows(cfg, device, torch.bfloat16, args.txt_tokens, args.size // 16,
                                         args.pictures, args.reps), args, peak)
        return
    from diffusers import QwenImageTransformer2DModel

    cfg = TransformerConfig(num_layers=args.layers)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        ref = QwenImageTransformer2DModel(**dataclasses.asdict(cfg)).eval()
    torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        ours = QwenImageTransformer(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    models = {"diffusers": ref}  # dropped before the offload rows, which must see only qimg's weights
    del ref

    side = args.size // 16
    g = torch.Generator(device).manual_seed(1)
    img = torch.randn(2, side * side, cfg.in_channels, device=device, dtype=torch.bfloat16, generator=g)
    txt = torch.randn(2, args.txt_tokens, cfg.joint_attention_dim, device=device, dtype=torch.bfloat16, generator=g)
    t = torch.full((2,), 0.7, device=device, dtype=torch.bfloat16)
    one = slice(0, 1)

    def reference(b):
        return models["diffusers"](hidden_states=img[b], encoder_hidden_states=txt[b], encoder_hidden_states_mask=None,
                                   timestep=t[b], img_shapes=[[(1, side, side)]], return_dict=False)[0]

    def qimg(b=one):
        return ours(img[b], txt[b], None, t[b], (side, side))

    fns = {"diffusers": lambda: reference(one), "qimg": qimg,
           "diffusers cfg": lambda: (reference(slice(0, 1)), reference(slice(1, 2))),
           "qimg cfg": lambda: qimg(slice(0, 2))}
    with torch.inference_mode():
        expected = reference(one).float()
        single = qimg().float()
        errors = {"qimg": (single - expected).abs().max().item()}
        seconds = timed(fns, args.reps, warmup=2, sync=torch.cuda.synchronize)
        models.clear()  # qimg's module now holds the only reference to the weights
        torch.cuda.empty_cache()
        streamed, streamed_peak = offload_seconds(ours, lambda: qimg(), args.reps)
        split = split_seconds(ours, qimg, single, args.reps)

        ours.compile_blocks()
        start = time.perf_counter()
        errors["qimg --compile"] = (qimg().float() - expected).abs().max().item()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        seconds.update(timed({"qimg --compile": qimg, "qimg --compile cfg": lambda: qimg(slice(0, 2))}, args.reps,
                             warmup=1, sync=torch.cuda.synchronize))
    print(machine())
    print(f"transformer: {cfg.num_layers} blocks x hidden {cfg.dim}, {side * side} image + {args.txt_tokens} text "
          f"tokens, bf16, median of {args.reps}; compile took {compile_s:.0f} s\n")
    flops = forward_flops(cfg, side * side, args.txt_tokens)
    print(f"{'':<22} {'s/forward':>10} {'TFLOP/s':>8} {'% peak':>7} {'vs diffusers':>13}   max |diff|")
    for row in ("diffusers", "qimg", "qimg --compile"):
        for suffix, n in (("", 1), (" cfg", 2)):
            s = seconds[row + suffix] / n
            tflops = flops / s / 1e12
            share = f"{100 * tflops / peak:6.1f}%" if peak else "   n/a"
            ratio = seconds["diffusers" + suffix] / seconds[row + suffix]
            print(f"{row + suffix:<22} {s:>9.3f}s {tflops:>8.0f} {share:>7} {ratio:>12.2f}x   {errors.get(row, 0):.1e}")
    if split is None:
        print(f"{'qimg --devices':<22} skipped: {torch.cuda.device_count()} GPU visible, the layer split needs 2")
    else:
        s, diff, peaks = split
        print(f"{'qimg --devices 0,1':<22} {s:>9.3f}s {'':>8} {'':>7} {seconds['diffusers'] / s:>12.2f}x   {diff:.1e} "
              f"vs one GPU; peak GPU memory {peaks[0] / 2**30:.1f} + {peaks[1] / 2**30:.1f} GiB")
    print(f"{'qimg --offload blocks':<22} {streamed:>9.3f}s {'':>8} {'':>7} {seconds['diffusers'] / streamed:>12.2f}x"
          f"   peak GPU memory {streamed_peak / 2**30:.1f} GiB")
    parallel_modes(args)


def parallel_modes(args) -> None:
    """benchmarks/parallel.py's table on the GPUs, when there are two or more."""
    gpus = torch.cuda.device_count()
    print()
    if gpus < 2:
        print(f"one image on several GPUs (benchmarks/parallel.py): {gpus} GPU visible, the modes need 2: skipped")
        return
    subprocess.run([sys.executable, str(Path(__file__).with_name("parallel.py")), "--device", "cuda", "--width",
                    "real", "--layers", str(args.layers), "--size", str(args.size), "--txt-tokens",
                    str(args.txt_tokens), "--reps", str(args.reps), "--ranks", str(min(gpus, 4))], check=False)


def split_seconds(ours, forward, single, reps) -> tuple[float, float, list[int]] | None:
    """--devices cuda:0,cuda:1: the blocks halved over two GPUs and run as --devices runs them (model/split.py), the
    layers around them on the first. Seconds per forward, the largest difference from one GPU's output `single`
    (0 expected: the same kernels in the same order; a tensor left on the wrong GPU fails instead) and each GPU's
    peak memory; then the blocks go back to the first GPU. None with fewer than two GPUs."""
    if torch.cuda.device_count() < 2:
        return None
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    half = len(ours.transformer_blocks) // 2
    place_split(ours, [(devices[0], 0, half), (devices[1], half, len(ours.transformer_blocks))], devices[0])
    torch.cuda.empty_cache()
    for device in devices:
        torch.cuda.reset_peak_memory_stats(device)
    diff = (forward().float() - single).abs().max().item()
    seconds = timed({"split": forward}, reps, warmup=1,
                    sync=lambda: [torch.cuda.synchronize(device) for device in devices])["split"]
    peaks = [torch.cuda.max_memory_allocated(device) for device in devices]
    del ours.run_blocks
    ours.transformer_blocks.to(devices[0])
    torch.cuda.empty_cache()
    return seconds, diff, peaks


def offload_seconds(ours, forward, reps) -> tuple[float, int]:
    """Seconds per forward and peak GPU memory with the blocks streamed from pinned CPU memory; then the blocks
    go back to the GPU and the plain loop is restored."""
    device = torch.device("cuda")
    for block in ours.transformer_blocks:
        block.to("cpu")
    ours.run_blocks = BlockStream(ours.transformer_blocks, device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed({"blocks": forward}, reps, warmup=1, sync=torch.cuda.synchronize)["blocks"]
    peak = torch.cuda.max_memory_allocated()
    del ours.run_blocks
    ours.transformer_blocks.to(device)
    return seconds, peak


def forward21_flops(cfg: Transformer21Config, queries: int, keys: int) -> float:
    """Matmul FLOPs of one batch-1 2.1 forward over `queries` tokens attending to at most `keys` (block-causal
    attention counted as full: an upper bound): q, k, v, out (4 d^2) and the SwiGLU MLP (3 x 3 d^2) per token."""
    d = cfg.dim
    return cfg.num_layers * (2 * queries * 13 * d * d + 4 * queries * keys * d)


def transformer21_rows(cfg: Transformer21Config, device: torch.device, dtype: torch.dtype, txt_tokens: int, side: int,
                       pictures: int, reps: int) -> dict:
    """Qwen-Image-2.1's transformer at `cfg`'s width with random weights on `device`: seconds of one forward without
    the prefix cache ("no cache"), of the one that fills it ("cache fill") and of one that reads it ("cache read"),
    the token counts, and max |cached - uncached| of the outputs. side: the latent grid's side (pixels / 16)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = QwenImage21Transformer(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    slot = side * side // 4  # text-encoder slots per picture: one per 2x2 latents
    img_mask = torch.tensor(([False] * txt_tokens + [True] * slot) * pictures + [False] * txt_tokens)
    grids = [(side, side)] * (pictures + 1)
    layout = build_layout(img_mask, grids, cfg.axes_dims_rope, device=device)
    g = torch.Generator(device).manual_seed(1)
    latents = torch.randn(1, side * side * (pictures + 1), cfg.in_channels, device=device, dtype=dtype, generator=g)
    txt = torch.randn(1, len(img_mask), cfg.context_in_dim, device=device, dtype=dtype, generator=g)
    t = torch.full((1,), 0.7, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.inference_mode():
        plain = model(latents, txt, t, layout)
        cache = PrefixCache()
        model(latents, txt, t, layout, cache)
        diff = (model(latents, txt, t, layout, cache).float() - plain.float()).abs().max().item()
        rows = {"no cache": lambda: model(latents, txt, t, layout),
                "cache fill": lambda: model(latents, txt, t, layout, PrefixCache()),
                "cache read": lambda: model(latents, txt, t, layout, cache)}
        seconds = timed(rows, reps, warmup=1, sync=sync)
        for block in model.transformer_blocks:  # --offload blocks: streamed from (pinned) CPU memory
            block.to("cpu")
        model.stream = BlockStream(model.transformer_blocks, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        streamed = timed({f"offload {row}": rows[row] for row in ("no cache", "cache read")}, reps, warmup=1, sync=sync)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        diff = max(diff, (rows["cache read"]().float() - plain.float()).abs().max().item())
    return dict(seconds={**seconds, **streamed}, tokens=layout.length, prefix=layout.prefix, diff=diff,
                offload_peak=peak)


def report21(cfg: Transformer21Config, rows: dict, args, peak: float | None) -> None:
    seconds, n, prefix = rows["seconds"], rows["tokens"], rows["prefix"]
    print(machine())
    print(f"Qwen-Image-2.1 transformer: {cfg.num_layers} blocks x hidden {cfg.dim}, bf16, {args.txt_tokens} text "
          f"tokens, {args.pictures} condition pictures and the target at {args.size}x{args.size}: {n} tokens, "
          f"{prefix} of them the prefix; median of {args.reps}\n")
    print(f"{'':<20} {'s/forward':>10} {'TFLOP/s':>8} {'% peak':>7}")
    for row, queries in (("no cache", n), ("cache fill", n), ("cache read", n - prefix),
                         ("offload no cache", n), ("offload cache read", n - prefix)):
        tflops = forward21_flops(cfg, queries, n) / seconds[row] / 1e12
        share = f"{100 * tflops / peak:6.1f}%" if peak else "   n/a"
        print(f"{row:<20} {seconds[row]:>9.3f}s {tflops:>8.0f} {share:>7}")
    print(f"--offload blocks: peak GPU memory {rows['offload_peak'] / 2**30:.1f} GiB")
    off = args.steps * seconds["no cache"]
    on = seconds["cache fill"] + (args.steps - 1) * seconds["cache read"]
    print(f"\none image of {args.steps} steps: {off:.1f} s of transformer without the cache, {on:.1f} s with it "
          f"({off / on:.2f}x); max |cached - uncached| {rows['diff']:.1e}")


if __name__ == "__main__":
    main()
