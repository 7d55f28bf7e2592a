"""The worker: a shell loop of `qimg generate` calls, cold processes against a warm worker.

    PYTHONPATH=. python benchmarks/worker.py [--calls 20] [--steps N] [--model builtin]

Writes two bash scripts of N calls (different prompts and seeds), runs the first with QIMG_WORKER=0 (every
call imports torch and loads the model) and the second after `qimg worker start`, checks the outputs are
byte-identical, and prints both loop times, their ratio, and the per-call overhead of a worker job: the wall
time of a whole `--steps 1` job through the worker, and of that the part outside the job (client start-up,
hand-off, reply: wall minus the job's own `seconds`). Socket, log and caches live in a temporary folder, so a
worker of the user's is neither used nor stopped.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ("red", "blue", "green", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "star")


def loop_script(calls: int, folder: Path, model: str, steps) -> str:
    qimg = f"{shlex.quote(sys.executable)} -m qimg generate -m {shlex.quote(model)}"
    extra = f" --steps {steps}" if steps else ""
    lines = [f'{qimg} -p "a {COLOURS[i % 5]} {SHAPES[i % 4]}" --seed {i + 1}{extra} -o {folder}/{i:02d}.png'
             for i in range(calls)]
    return "set -e\n" + "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--steps", type=int, help="[default: the model's]")
    p.add_argument("--model", default="builtin")
    p.add_argument("--overhead-reps", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "run").mkdir(mode=0o700)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "XDG_RUNTIME_DIR": str(tmp / "run"), "XDG_STATE_HOME": str(tmp / "state"), "HF_HUB_OFFLINE": "1"}
        seconds = {}
        for mode in ("cold", "worker"):
            (tmp / mode).mkdir()
            script = tmp / f"{mode}.sh"
            script.write_text(loop_script(args.calls, tmp / mode, args.model, args.steps))
            run_env = {**env, "QIMG_WORKER": "0" if mode == "cold" else "1",
                       "QIMG_CACHE_DIR": str(tmp / f"cache-{mode}")}
            if mode == "worker":
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "qimg", "worker", "start"], env=run_env, check=True)
                seconds["start"] = time.perf_counter() - started
            started = time.perf_counter()
            subprocess.run(["bash", str(script)], env=run_env, check=True, capture_output=True)
            seconds[mode] = time.perf_counter() - started
        same = all((tmp / "cold" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "worker").iterdir())
        overhead, job = [], []
        for i in range(args.overhead_reps):
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "qimg", "generate", "-m", args.model, "-p", "a circle",
                                  "--steps", "1", "--seed", str(i), "-o", str(tmp / f"o{i}.png"), "--json"],
                                 env={**run_env, "QIMG_WORKER": "1"}, check=True, capture_output=True, text=True)
            wall = time.perf_counter() - started
            job.append(wall)
            overhead.append(wall - json.loads(out.stdout)["seconds"])
        subprocess.run([sys.executable, "-m", "qimg", "worker", "stop"], env=run_env, check=True, capture_output=True)
    print(machine())
    print(f"{args.calls} x qimg generate -m {args.model} (steps {args.steps or 'default'}), one bash loop each\n")
    print(f"cold processes (QIMG_WORKER=0)  {seconds['cold']:7.1f} s  {seconds['cold'] / args.calls:6.2f} s/call")
    print(f"with a worker                   {seconds['worker']:7.1f} s  {seconds['worker'] / args.calls:6.2f} s/call"
          f"   (+ {seconds['start']:.1f} s `qimg worker start`, once)")
    print(f"speed-up                        {seconds['cold'] / seconds['worker']:7.2f} x"
          f"   ({seconds['cold'] / (seconds['worker'] + seconds['start']):.2f} x counting the start)")
    print(f"outputs byte-identical          {'yes' if same else 'NO'}")
    print(f"worker job, --steps 1, whole    {statistics.median(job):7.3f} s  (median of {args.overhead_reps})")
    print(f"  of which outside the job      {statistics.median(overhead):7.3f} s  (client start-up, hand-off, reply)")


if __name__ == "__main__":
    main()
