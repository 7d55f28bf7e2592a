"""Start the ranks of one image as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; one
thread each) without its agent, so a test sees each rank's own exit code and lines, and can kill one."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], ranks: int = 2, timeout: float = 30, cwd=None) -> list[subprocess.Popen]:
    """`python ARGV...` once per rank (argv[0] `-m` runs a module), stdout and stderr piped."""
    port = free_port()
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1", "QIMG_WORKER": "0",
               "QIMG_PARALLEL_TIMEOUT": str(timeout), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def run(argv: list[str], ranks: int = 2, timeout: float = 30, cwd=None, wait: float = 180) -> list[tuple]:
    """Each rank's (exit code, stdout, stderr), every rank run to its end."""
    procs = start(argv, ranks, timeout, cwd)
    try:
        outputs = [p.communicate(timeout=wait) for p in procs]
        return [(p.returncode, *output) for p, output in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
