"""Cost of the inpainting attention mask: plain SDPA vs the article's dense N x N mask vs qimg's split.

    python benchmarks/attention_mask.py                      # fp32 on CPU, then bf16 on CUDA if present
    python benchmarks/attention_mask.py --img-tokens 1024 --kept 0.75 --reps 7 --skip-model

Methods, timed interleaved (a, b, c, d, a, b, c, d, ...) and reported as medians:
  (a) plain       one SDPA call, no mask (what inpainting costs without the attention mask)
  (b) dense       one SDPA call with a dense (1, 1, N, N) bool mask, built once outside the timing
  (c) split       qimg's split_attention: kept->kept unmasked, [text; edited]->all (the real code path)
  (d) contiguous  (c) with the groups already contiguous (slices, no gather/scatter): its lower bound
Then the whole transformer forward with keep=None vs a keep mask.
"""

import argparse
import math

import torch
from common import machine, sync, timed

from qimg.model.transformer import (
    QwenImageTransformer,
    TransformerConfig,
    attention,
    attention_plan,
    split_attention,
)


def hole_keep(side: int, kept: float) -> torch.Tensor:
    """(side*side,) keep mask of a square grid with a centred square hole of about 1 - kept of the area."""
    hole = round(side * math.sqrt(1 - kept))
    top = (side - hole) // 2
    keep = torch.ones(side, side, dtype=torch.bool)
    keep[top:top + hole, top:top + hole] = False
    return keep.flatten()


def dense_mask(keep: torch.Tensor, txt_len: int) -> torch.Tensor:
    """(1, 1, N, N) bool: kept image queries see kept image keys; text and edited queries see everything."""
    kept = torch.cat([torch.zeros(txt_len, dtype=torch.bool, device=keep.device), keep])
    return (~kept[:, None] | kept[None, :])[None, None]


@torch.inference_mode()
def bench_attention(args, device, dtype):
    print(f"\nattention alone: {args.heads} heads x {args.head_dim} dims, {args.txt_tokens} text tokens, "
          f"batch 1, {dtype}, median of {args.reps} ms")
    print(f"{'img':>6} {'kept':>6} | {'(a) plain':>10} {'(b) dense':>10} {'(c) split':>10} {'(d) contig':>10} | "
          f"{'a/b':>5} {'c/b':>5} {'d/b':>5} {'c/a':>5} | max|c-b|")
    for img_len in args.img_tokens:
        side = math.isqrt(img_len)
        if side * side != img_len:
            raise SystemExit(f"--img-tokens {img_len} is not a square grid")
        n = args.txt_tokens + img_len
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, n, args.heads, args.head_dim, generator=g, device=device, dtype=dtype)
                   for _ in range(3))
        for kept_fraction in args.kept:
            keep = hole_keep(side, kept_fraction).to(device)
            plan = attention_plan(None, keep, args.txt_tokens, img_len)
            mask = dense_mask(keep, args.txt_tokens)
            # (d): the same tokens reordered once as [text; edited; kept], so both groups are slices.
            order = torch.cat([plan.rest, plan.kept])
            qs, ks, vs = q[:, order], k[:, order], v[:, order]
            r = plan.rest.numel()

            fns = {
                "a": lambda: attention(q, k, v, None),
                "b": lambda: attention(q, k, v, mask),
                "c": lambda: split_attention(q, k, v, None, plan.kept, plan.rest),
                "d": lambda: torch.cat([attention(qs[:, :r], ks, vs, None),
                                        attention(qs[:, r:], ks[:, r:], vs[:, r:], None)], dim=1),
            }
            ms = {name: 1e3 * s for name, s in timed(fns, args.reps, args.warmup, sync(device)).items()}
            diff = (fns["c"]().float() - fns["b"]().float()).abs().max().item()
            real_kept = keep.float().mean().item()
            print(f"{img_len:>6} {real_kept:>6.1%} | {ms['a']:>10.1f} {ms['b']:>10.1f} {ms['c']:>10.1f} "
                  f"{ms['d']:>10.1f} | {ms['a'] / ms['b']:>5.2f} {ms['c'] / ms['b']:>5.2f} "
                  f"{ms['d'] / ms['b']:>5.2f} {ms['c'] / ms['a']:>5.2f} | {diff:.1e}")


@torch.inference_mode()
def bench_model(args, device, dtype):
    head_dim = args.model_dim // args.model_heads
    axis = (head_dim // 4) // 2 * 2  # frame slice; rows and cols split the rest evenly (all even)
    rest = (head_dim - axis) // 2 // 2 * 2
    cfg = TransformerConfig(
        num_layers=args.model_layers, num_attention_heads=args.model_heads, attention_head_dim=head_dim,
        joint_attention_dim=args.model_dim, axes_dims_rope=(head_dim - 2 * rest, rest, rest),
    )
    side = math.isqrt(args.model_img)
    torch.manual_seed(0)
    model = QwenImageTransformer(cfg).to(device, dtype).eval()
    img = torch.randn(1, side * side, cfg.in_channels, device=device, dtype=dtype)
    txt = torch.randn(1, args.txt_tokens, cfg.joint_attention_dim, device=device, dtype=dtype)
    t = torch.tensor([0.5], device=device)
    fns = {"keep=None": lambda: model(img, txt, None, t, (side, side))}
    for kept_fraction in args.kept:
        keep = hole_keep(side, kept_fraction).to(device)
        fns[f"keep {keep.float().mean().item():.1%}"] = lambda keep=keep: model(img, txt, None, t, (side, side), keep)
    ms = {name: 1e3 * s for name, s in timed(fns, args.reps, args.warmup, sync(device)).items()}

    print(f"\nwhole forward: dim {cfg.dim} ({cfg.num_attention_heads} x {head_dim}), {cfg.num_layers} blocks, "
          f"{side * side} image + {args.txt_tokens} text tokens, {dtype}, median of {args.reps} ms")
    for name, value in ms.items():
        print(f"  {name:<12} {value:>9.1f} ms   x{value / ms['keep=None']:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--img-tokens", type=int, nargs="+", default=[1024, 4096], help="square grids only")
    p.add_argument("--txt-tokens", type=int, default=96)
    p.add_argument("--kept", type=float, nargs="+", default=[0.75, 0.9], help="kept fraction of image tokens")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    p.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when absent")
    p.add_argument("--model-dim", type=int, default=512)
    p.add_argument("--model-heads", type=int, default=8)
    p.add_argument("--model-layers", type=int, default=4)
    p.add_argument("--model-img", type=int, default=1024, help="image tokens (a square grid)")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    for name in args.devices.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            print("\n(cuda not available: skipped)")
            continue
        device = torch.device(name)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        print(f"\n=== {name}" + (f": {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
        bench_attention(args, device, dtype)
        if not args.skip_model:
            bench_model(args, device, dtype)


if __name__ == "__main__":
    main()
