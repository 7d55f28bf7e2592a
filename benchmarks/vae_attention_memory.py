"""Peak memory of the VAE's mid-block attention on CPU: the old (B, HW, C) strided call vs qimg's.

    python benchmarks/vae_attention_memory.py            # 512, 768 and 1024 px images, real width (384 channels)

SDPA on CPU takes its flash kernel only for 4D contiguous inputs; otherwise it builds the (HW, HW) score
matrix. Each variant runs in its own process and reports the growth of peak RSS during the call, so the
numbers do not mix. Prints a row per size and the ratio old / qimg.
"""

import argparse
import json
import subprocess
import sys

from common import machine

PROBE = """
import json, resource, sys, torch, torch.nn.functional as F
from qimg.model.vae import attention
torch.set_num_threads(1)
variant, side, channels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
qkv = torch.randn(1, 3 * channels, side // 8, side // 8)  # the mid block runs at 1/8 of the image side


def strided(qkv):  # qimg before the fix: 3D strided views
    B, C3, H, W = qkv.shape
    q, k, v = qkv.flatten(2).transpose(1, 2).chunk(3, dim=-1)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C3 // 3, H, W)


before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(strided if variant == "strided" else attention)(qkv)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""


def peak_mb(variant: str, side: int, channels: int) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, variant, str(side), str(channels)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--channels", type=int, default=384, help="mid-block width (Qwen-Image: 384)")
    args = parser.parse_args()
    print(f"# {machine()}; CPU, float32")
    print(f"{'image':>10} {'old MB':>10} {'qimg MB':>10} {'old/qimg':>9}")
    for side in args.sizes:
        old, new = peak_mb("strided", side, args.channels), peak_mb("qimg", side, args.channels)
        print(f"{side:>5}x{side:<4} {old:>10.0f} {new:>10.0f} {old / max(new, 1):>9.1f}")


if __name__ == "__main__":
    main()
