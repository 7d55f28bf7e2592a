"""Batches beyond one process: N built-in-model generations (`generate --prompts`) as one process, as two
shards under torchrun (one thread each) and over Ray with two actors (a local cluster started by the run).

    PYTHONPATH=. python benchmarks/scale.py [--prompts 24] [--steps N] [--reps 1]

Every run is a fresh command, timed from its start to its exit (imports, model loads, Ray's cluster and
actors included), one torch thread per process (OMP_NUM_THREADS=1: torchrun and Ray set it for their workers
too). Prints wall times, the ratio to the single process, whether all outputs are byte-identical, and Ray's
per-file overhead: over the batch, the actors' time not spent in the jobs themselves, per file, i.e.
(actors x (last result - first job's start) - sum of the jobs' own seconds) / files, from the --json lines as
they arrive (it includes the scheduling, the hand-off both ways and the per-file checks of a one-file job).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")


def command(kind: str, prompts: Path, out: Path, steps) -> list[str]:
    qimg = ["-m", "qimg", "generate", "--prompts", str(prompts), "--out-dir", str(out), "--seed", "7",
            "--device", "cpu", "--no-cache", "--json"] + (["--steps", str(steps)] if steps else [])
    if kind == "1 process":
        return [sys.executable, *qimg]
    if kind == "2 shards (torchrun)":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *qimg,
                "--shard", "auto"]
    return [sys.executable, *qimg, "--ray", "local", "--ray-workers", "2"]


def timed_run(argv: list[str], env: dict) -> tuple[float, list[tuple[float, dict]]]:
    """Wall seconds, and each --json line with the second it arrived at (from the start)."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [(time.perf_counter() - started, json.loads(line)) for line in process.stdout]
    err = process.stderr.read()
    if process.wait() != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return time.perf_counter() - started, lines


def ray_overhead(lines: list[tuple[float, dict]], actors: int = 2) -> float:
    first_start = min(t - r["seconds"] for t, r in lines)
    busy = actors * (max(t for t, _ in lines) - first_start)
    return (busy - sum(r["seconds"] for _, r in lines)) / len(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--steps", type=int, help="[default: the model's, 24]")
    p.add_argument("--reps", type=int, default=1, help="runs of each, interleaved; medians are reported")
    args = p.parse_args()
    kinds = ("1 process", "2 shards (torchrun)", "Ray, 2 actors")
    runs = {kind: [] for kind in kinds}  # (wall, lines) per run
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.txt"
        prompts.write_text("".join(f"a {COLOURS[i % 6]} {SHAPES[i % 4]}, number {i}\n" for i in range(args.prompts)))
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": "1", "QIMG_WORKER": "0", "HF_HUB_OFFLINE": "1"}
        outputs = {}
        for rep in range(args.reps):
            for kind in kinds:
                out = tmp / f"{kind[:1]}{rep}"
                runs[kind].append(timed_run(command(kind, prompts, out, args.steps), env))
                outputs[kind, rep] = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
    first = outputs[kinds[0], 0]
    same = len(first) == args.prompts and all(o == first for o in outputs.values())

    def median(kind, of):
        return statistics.median(of(wall, lines) for wall, lines in runs[kind])

    base = median(kinds[0], lambda wall, _: wall)
    print(machine())
    print(f"{args.prompts} x generate (built-in model, steps {args.steps or 'default'}), one torch thread per "
          f"process, medians of {args.reps}\n")
    print(f"{'':22s} {'wall':>7s}  {'ratio':>6s}  {'start':>6s}  {'one file':>8s}  {'exit':>6s}")
    for kind in kinds:
        wall = median(kind, lambda wall, _: wall)
        start = median(kind, lambda _, lines: min(t - r["seconds"] for t, r in lines))
        job = statistics.median(r["seconds"] for _, lines in runs[kind] for _, r in lines)
        end = median(kind, lambda wall, lines: wall - max(t for t, _ in lines))
        print(f"{kind:22s} {wall:6.1f}s  {base / wall:5.2f}x  {start:5.1f}s  {job:7.2f}s  {end:5.1f}s")
    print("(start: until the first job began: Python and qimg start-up, torchrun's or Ray's own (cluster, actor "
          "processes); the first job of each process also imports torch and loads the model. one file: a job's own "
          "seconds, longer when the processes share busy cores; exit: from the last result to the command's exit)")
    print(f"outputs byte-identical  {'yes' if same else 'NO'}")
    print(f"Ray's per-file overhead  {median(kinds[2], lambda _, lines: ray_overhead(lines)):.3f} s  "
          "(actor time outside the jobs, per file)")


if __name__ == "__main__":
    main()
