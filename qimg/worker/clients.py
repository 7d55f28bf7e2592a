"""The worker's side of its clients: the socket it listens on (0600 from the start), who is calling, the Job a
connection queues, whether the job's environment lets it run in this worker, and lines and messages back to a
client that never fail the worker when the client has gone."""

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from qimg.worker.protocol import send


@dataclass(eq=False)
class Job:
    conn: socket.socket
    message: dict
    fds: list
    running: bool = False  # handed to the job process
    cancelled: int | None = None  # the signal a cancel asked for
    cancelled_at: float = 0.0
    id: int = 0


FIXED = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "OMP_", "MKL_", "OPENBLAS_")


def fixed_settings(env: dict) -> dict:
    """The environment a process reads once (torch's threads and devices, the hub's folders): a job whose
    values differ from the worker's would not run as it would in-process."""
    return {k: v for k, v in env.items() if k.startswith(FIXED)}


def differences(ours: dict, theirs: dict) -> list[str]:
    return sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


def send_quietly(conn: socket.socket, message: dict) -> None:
    try:
        send(conn, message)
    except OSError:
        pass  # the client went away; its reader thread cancels the job


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def tell(job: Job, line: str) -> None:
    """A line on the client's stderr, from outside the job's run."""
    try:
        os.write(job.fds[2], f"{line}\n".encode())
    except (OSError, IndexError):
        pass


def bind(path: Path) -> socket.socket:
    """The worker's socket, 0600 from the start (bound under umask 0177); it refuses connections until it
    listens."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(umask)
    return listener
