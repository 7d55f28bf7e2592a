"""--reuse and --cfg-until on the built-in model: transformer calls, image fidelity and wall time against the
full run of the same seed.

    PYTHONPATH=. python benchmarks/speed_options.py [--cases 12] [--threads 1]

12 captions (English, Chinese, mixed; seeds 1000-1011), 128x128, 24 steps, CFG 4. Cost = calls / the full
run's calls (a CFG pair counts 2); PSNR and SSIM of the decoded image against the full run's; time = the
options' wall time over the full run's, the two runs of each case interleaved.
"""

import argparse
import sys
from pathlib import Path

import torch
from common import machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_shortcuts import measure  # noqa: E402  (the quality gates' own measurement)

from qimg.engine.engine import Engine  # noqa: E402
from qimg.sampling import Shortcuts  # noqa: E402
from qimg.weights.folders import builtin_model  # noqa: E402

SETTINGS = {"--reuse 0.05": Shortcuts(reuse=0.05), "--reuse 0.1": Shortcuts(reuse=0.1),
            "--reuse 0.2": Shortcuts(reuse=0.2), "--cfg-until 0.5": Shortcuts(cfg_until=0.5),
            "--cfg-until 0.75": Shortcuts(cfg_until=0.75),
            "--reuse 0.1 --cfg-until 0.75": Shortcuts(reuse=0.1, cfg_until=0.75)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    engine = Engine(builtin_model(), "cpu", "float32")
    print(f"{'options':<30} {'cost':>6} {'PSNR mean/min':>15} {'SSIM mean/min':>15} {'time':>6}")
    for name, shortcuts in SETTINGS.items():
        m = measure(engine, shortcuts, args.cases)
        print(f"{name:<30} {m['cost']:6.2f} {m['psnr_mean']:7.1f}/{m['psnr_min']:<7.1f} "
              f"{m['ssim_mean']:7.3f}/{m['ssim_min']:<7.3f} {m['time']:6.2f}")


if __name__ == "__main__":
    main()
