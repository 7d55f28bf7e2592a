"""Shared by the benchmark scripts: a model to run when none is given, interleaved timing, the machine line."""

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def tests_on_path() -> None:
    """Make the tests' checkpoint builders importable."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build_tiny_model(folder: Path) -> Path:
    """The tests' tiny random-weight checkpoint: it exercises every code path but judges no quality."""
    tests_on_path()
    from tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(folder)


def timed(fns: dict, reps: int, warmup: int = 1, sync=None) -> dict:
    """Median seconds per function, repetitions interleaved so drifting machine load hits all alike.
    sync: called before and after each run (torch.cuda.synchronize on a GPU)."""
    sync = sync or (lambda: None)
    times = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def sync(device):
    """What `timed` needs to wait for a device's queued work."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else None


def machine() -> str:
    """One line naming what the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch

        lib = f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
        if torch.cuda.is_available():
            lib += f", {torch.cuda.get_device_name()}"
    except ImportError:
        lib = "no torch"
    return (f"{datetime.date.today()}  {cpu}, {os.cpu_count()} cores visible, load {os.getloadavg()[0]:.1f}, "
            f"Python {platform.python_version()}, {lib}")
