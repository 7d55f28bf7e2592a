"""One image on several processes: seconds per sampling step (one transformer call on a CFG pair) for each mode
(--cfg-parallel, --ulysses 2, --tp 2, and their products when there are ranks for them), beside the one-process
run in the same invocation, with the bytes each rank sends per step computed from the shapes
(qimg.parallel.layout.exchanged_bytes) and the largest difference from the one-process velocity.

    PYTHONPATH=. python benchmarks/parallel.py                    # tiny transformer, CPU, gloo, 1 thread per rank
    PYTHONPATH=. python benchmarks/parallel.py --width real --layers 4 --size 512 --device cuda  # 2+ GPUs, NCCL

Random weights (seeded) are written once to a temporary safetensors folder: every rank reads them as qimg does
(tensor parallel ranks their slices only). Each mode's ranks start as torchrun would start them (RANK,
WORLD_SIZE, MASTER_ADDR, ...), the ranks of a mode on cuda:0..N-1. On a CPU the figures prove the plumbing,
not a speed-up: the ranks share the machine's cores.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"1 process": {}, "--cfg-parallel": {"cfg": True}, "--ulysses 2": {"ulysses": 2}, "--tp 2": {"tp": 2},
         "--cfg-parallel --ulysses 2": {"cfg": True, "ulysses": 2}, "--ulysses 2 --tp 2": {"ulysses": 2, "tp": 2}}
WIDTHS = {"tiny": dict(attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(4, 6, 6)),
          "real": {}}  # real: Qwen-Image's 24 heads x 128


def config(args):
    from qimg.model.transformer import TransformerConfig

    return TransformerConfig(num_layers=args.layers, **WIDTHS[args.width])


def rank_main(args) -> None:
    """One rank: load the transformer as the mode says, time `reps` CFG-pair calls (rank 0 drives), report."""
    import time

    import torch

    torch.set_num_threads(args.threads)
    from qimg.model.transformer import QwenImageTransformer
    from qimg.parallel.layout import Layout
    from qimg.weights.folders import load_module

    cfg, layout = config(args), Layout(**json.loads(args.layout))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda" else "cpu")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    group = None
    if layout.world > 1:
        from qimg.parallel.group import Group

        group = Group(layout, device)
    if layout.tp > 1:
        from qimg.parallel.tensor import load_split

        module = load_split(cfg, Path(args.folder), dtype, device, group.mesh["tp"])
    else:
        module = load_module(lambda: QwenImageTransformer(cfg), Path(args.folder), dtype, device)
    model = group.wrap(module) if group else module
    side = args.size // 16
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, side * side, cfg.in_channels, generator=g).to(device, dtype),
              torch.randn(2, args.txt_tokens, cfg.joint_attention_dim, generator=g).to(device, dtype), None,
              torch.full((2,), 0.7).to(device, dtype), (side, side))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        if group is not None and not group.lead:
            group.serve(model)
            group.close()
            return
        out = model(*inputs)
        times = []
        for _ in range(args.reps):
            sync()
            start = time.perf_counter()
            out = model(*inputs)
            sync()
            times.append(time.perf_counter() - start)
        if group is not None:
            group.close()
    torch.save(out.float().cpu(), Path(args.out).with_suffix(".pt"))
    Path(args.out).write_text(json.dumps({"seconds": sorted(times)[len(times) // 2]}))


def launch(args, name: str, layout: dict, folder: Path, out: Path) -> dict | None:
    from qimg.parallel.layout import Layout

    world = Layout(**layout).world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, __file__, "--rank", "--layout", json.dumps(layout), "--folder", str(folder), "--out",
            str(out), *sys.argv[1:]]
    procs = [subprocess.Popen(argv, env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                         "OMP_NUM_THREADS": str(args.threads)}, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        print(f"{name}: failed: {next(e for e in errors if e.strip()).strip().splitlines()[-1]}")
        return None
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", choices=WIDTHS, default="tiny")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--txt-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ranks", type=int, default=2, help="the most ranks a mode may use (4: the products too)")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank:
        return rank_main(args)
    import torch
    from common import machine
    from safetensors.torch import save_file

    from qimg.model.transformer import QwenImageTransformer
    from qimg.parallel.layout import Layout, exchanged_bytes

    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"--device cuda: {torch.cuda.device_count()} GPU(s) visible; the modes need 2 (NCCL puts one rank on "
              "each): skipped")
        return
    cfg = config(args)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in QwenImageTransformer(cfg).state_dict().items()},
                  folder / "model.safetensors")
        results, velocities = {}, {}
        for name, layout in MODES.items():
            if Layout(**layout).world > args.ranks or cfg.num_attention_heads % (layout.get("ulysses", 1) *
                                                                                 layout.get("tp", 1)):
                continue
            out = Path(tmp) / f"{len(results)}.json"
            results[name] = launch(args, name, layout, folder, out)
            if results[name] is not None:
                velocities[name] = torch.load(out.with_suffix(".pt"))
    itemsize = 2 if args.device == "cuda" else 4
    side = args.size // 16
    print(machine())
    print(f"transformer: {cfg.num_layers} blocks x hidden {cfg.dim} ({cfg.num_attention_heads} heads), "
          f"{side * side} image + {args.txt_tokens} text tokens, a CFG pair per step, {args.device}, "
          f"{args.threads} thread(s) per rank, median of {args.reps}\n")
    print(f"{'mode':<28} {'ranks':>5} {'s/step':>9} {'vs 1':>6} {'MB sent/rank/step':>18}   max |diff| vs 1")
    base = results.get("1 process")
    for name, result in results.items():
        if result is None:
            continue
        layout = Layout(**MODES[name])
        sent = exchanged_bytes(layout, cfg.dim, cfg.num_layers, args.txt_tokens, side * side, side * side,
                               cfg.patch_size ** 2 * cfg.out_channels, itemsize, rows=1 if layout.cfg else 2)
        diff = (velocities[name] - velocities["1 process"]).abs().max().item() if "1 process" in velocities else 0
        ratio = base["seconds"] / result["seconds"] if base else float("nan")
        print(f"{name:<28} {layout.world:>5} {result['seconds']:>8.3f}s {ratio:>5.2f}x "
              f"{sum(sent.values()) / 1e6:>18.2f}   {diff:.1e}")


if __name__ == "__main__":
    main()
