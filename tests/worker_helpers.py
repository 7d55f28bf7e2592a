"""Shared by the worker tests: run `python -m qimg` in a subprocess with a private socket and log folder,
start and stop the one worker a test module shares."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "1", "--seed", "3", "--device", "cpu", "--cfg", "1"]


def worker_env(root: Path) -> dict:
    """XDG folders under `root` (the socket folder made 0700 as qimg would), the worktree's qimg."""
    runtime = root / "run"
    runtime.mkdir(exist_ok=True)
    return {"XDG_RUNTIME_DIR": str(runtime), "XDG_STATE_HOME": str(root / "state"), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


def qimg(args, env: dict, cwd=None, mode="1", wait=True, **kwargs):
    """`qimg ARGS` with QIMG_WORKER=mode; the test's own environment (its QIMG_CACHE_DIR) under `env`."""
    full = {**os.environ, **env, "QIMG_WORKER": mode}
    command = [sys.executable, "-m", "qimg", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, env=full, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kwargs)
    return subprocess.run(command, env=full, cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def status(env: dict) -> dict | None:
    result = qimg(["worker", "status", "--json"], env)
    answer = json.loads(result.stdout)
    assert result.returncode == (0 if answer["running"] else 1)
    return answer if answer["running"] else None


def start(env: dict, idle=300, cwd=None) -> int:
    result = qimg(["worker", "start", "--idle", idle], env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return status(env)["pid"]


def stop(env: dict) -> None:
    answer = status(env)
    qimg(["worker", "stop"], env)
    if answer:
        gone(answer["pid"])


def gone(pid: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} still runs")


def wait_for_log(env: dict, text: str, count: int = 1, within: float = 60) -> None:
    """Until the worker log holds `text` `count` times (a job started, say)."""
    log = Path(env["XDG_STATE_HOME"]) / "qimg" / "worker.log"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the worker log")


def socket_path(env: dict) -> str:
    """The socket of the worker started with `env`."""
    folder = os.path.join(env["XDG_RUNTIME_DIR"], "qimg")
    return os.path.join(folder, next(n for n in os.listdir(folder) if n.endswith(".sock")))


def job(env: dict, argv: list) -> dict:
    """A job message as the client sends it, from the environment the worker was started with."""
    from qimg.worker.protocol import job_message

    message = job_message(argv)
    message["env"] = {**os.environ, **env}
    return message
