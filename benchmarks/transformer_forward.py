"""Transformer forward, qimg vs diffusers' QwenImageTransformer2DModel on the same random weights.

    PYTHONPATH=. python benchmarks/transformer_forward.py                  # CPU, float32 and bfloat16
    PYTHONPATH=. python benchmarks/transformer_forward.py --dtypes float32 --reps 3 --threads 1

Mid-size configuration by default: hidden 1024 (8 heads x 128), 4 blocks, 1024 image tokens (a 32x32 patch
grid, a 512x512 image) + 64 text tokens. Rows: one forward at batch 1, and one true-CFG step (the reference
pipeline runs the conditional and unconditional passes one after the other; qimg runs them as one batch of
2 when the two prompts have the same length). Repetitions are interleaved, medians reported; ratio = diffusers
time / qimg time (above 1: qimg is faster).
"""

import argparse
import dataclasses

import torch
from common import machine, sync, timed

from qimg.model.transformer import QwenImageTransformer, TransformerConfig


def build(cfg: TransformerConfig, dtype: torch.dtype, device: torch.device):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**dataclasses.asdict(cfg)).to(device, dtype).eval()
    with torch.device("meta"):
        ours = QwenImageTransformer(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


@torch.inference_mode()
def bench(cfg: TransformerConfig, dtype: torch.dtype, device: torch.device, side: int, txt_len: int, reps: int):
    ref, ours = build(cfg, dtype, device)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, side * side, cfg.in_channels, generator=g).to(device, dtype)
    txt = torch.randn(2, txt_len, cfg.joint_attention_dim, generator=g).to(device, dtype)
    t = torch.tensor([0.7, 0.7], device=device, dtype=dtype)

    def reference(b):
        return ref(hidden_states=img[b], encoder_hidden_states=txt[b], encoder_hidden_states_mask=None,
                   timestep=t[b], img_shapes=[[(1, side, side)]], return_dict=False)[0]

    one = slice(0, 1)
    fns = {
        "diffusers x1": lambda: reference(one),
        "qimg x1": lambda: ours(img[one], txt[one], None, t[one], (side, side)),
        "diffusers cfg": lambda: (reference(slice(0, 1)), reference(slice(1, 2))),
        "qimg cfg": lambda: ours(img, txt, None, t, (side, side)),
    }
    out, expected = fns["qimg x1"](), fns["diffusers x1"]()
    error = (out.float() - expected.float()).abs().max().item()
    return timed(fns, reps, warmup=1, sync=sync(device)), error


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim-heads", type=int, default=8, help="heads of 128 dims (Qwen-Image: 24)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--side", type=int, default=32, help="patch grid side: side*side image tokens")
    p.add_argument("--txt-tokens", type=int, default=64)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TransformerConfig(num_layers=args.layers, num_attention_heads=args.dim_heads)
    print(machine())
    print(f"transformer: hidden {cfg.dim}, {cfg.num_layers} blocks, {args.side ** 2} image + {args.txt_tokens} text "
          f"tokens, {device}, median of {args.reps} interleaved\n")
    print(f"{'dtype':<9} {'pass':<5} {'diffusers':>10} {'qimg':>10} {'ratio':>6}   max |diff|")
    for name in args.dtypes.split(","):
        seconds, error = bench(cfg, getattr(torch, name), device, args.side, args.txt_tokens, args.reps)
        for row in ("x1", "cfg"):
            ref, ours = seconds[f"diffusers {row}"], seconds[f"qimg {row}"]
            print(f"{name:<9} {row:<5} {ref:>9.3f}s {ours:>9.3f}s {ref / ours:>5.2f}x   {error:.1e}")


if __name__ == "__main__":
    main()
