"""The light side of the worker: decide whether a command goes to a worker, start one, submit a job and
relay its exit code. A job is sent as its argv with this process's standard streams (their file descriptors),
working directory, environment and umask (protocol.job_message); the worker re-runs the command line on them,
so no job classes cross the socket. Imports only the standard library (no torch, numpy, PIL or typer), so a
submitted job costs a bare Python start-up."""

import fcntl
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from contextlib import contextmanager

from qimg.errors import STOPS, say
from qimg.worker import paths
from qimg.worker.protocol import Messages, job_message, send

MODEL_COMMANDS = ("generate", "inpaint", "outpaint", "edit", "chain")  # the others are quick in-process
SPREADING = ("--shard", "--ray")  # runs that divide a batch between processes: each runs its part itself, never
# queued behind the others in one worker (torchrun's ranks would take turns in it, on its one device)
OFF = ("0", "false", "off", "no")  # QIMG_WORKER values that mean in-process
DEFAULT_IDLE = 600
READY_TIMEOUT = 120.0  # seconds a starting worker may take to import torch and listen


class WorkerError(Exception):
    """The worker could not be started or asked; the message is one line for the user."""


def command_of(argv: list[str]) -> str | None:
    """The subcommand: the first argument that is not an option (the root options are all flags)."""
    return next((a for a in argv if not a.startswith("-")), None)


def spreads(argv: list[str]) -> bool:
    """Whether the command divides its batch between processes (--shard, --ray)."""
    return any(a.split("=", 1)[0] in SPREADING for a in argv)


def connect() -> socket.socket | None:
    """A connection to this installation's running worker; None when none listens (no socket, or a stale
    one from a worker that died)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(paths.socket_path()))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def request(message: dict) -> dict | None:
    """Ask the running worker one question (ping, status, stop); None when none runs."""
    if not paths.check_dir(paths.socket_dir(), create=False):
        return None
    sock = connect()
    if sock is None:
        return None
    with sock:
        send(sock, message)
        return Messages(sock).next()


@contextmanager
def start_lock():
    """Held around check-spawn-wait, so two clients racing to start a worker make one."""
    with open(os.open(paths.lock_path(), os.O_RDWR | os.O_CREAT, 0o600), "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def start(idle: float = DEFAULT_IDLE) -> tuple[int, bool]:
    """Start this installation's worker unless one runs; return (pid, started now) once it answers."""
    paths.check_dir(paths.socket_dir(), create=True)
    with start_lock():
        answer = request({"op": "ping"})
        if answer is not None:
            return answer["pid"], False
        path = paths.socket_path()
        if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # stale: nothing listens (connect was refused)
        log = paths.log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as out:  # jobs' argv: yours
            process = subprocess.Popen(
                [sys.executable, "-m", "qimg.worker.server", "--socket", str(path), "--idle", str(idle)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, cwd="/")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise WorkerError(f"the qimg worker stopped while starting (exit {process.returncode}); see {log}")
            answer = request({"op": "ping"})
            if answer is not None:
                return answer["pid"], True
            time.sleep(0.05)
        process.kill()
        raise WorkerError(f"the qimg worker did not answer within {READY_TIMEOUT:.0f} s; see {log}")


def maybe_submit(argv: list[str]) -> int | None:
    """Run a model command in the worker and return its exit code; None when it should run in-process:
    not a model command, --no-worker or QIMG_WORKER=0, --shard or --ray, no worker running (QIMG_WORKER=auto
    starts one),
    or the worker could not be reached before the job started."""
    mode = os.environ.get("QIMG_WORKER", "1").strip().lower()
    if mode in OFF or "--no-worker" in argv or command_of(argv) not in MODEL_COMMANDS or spreads(argv):
        return None
    try:
        if not paths.check_dir(paths.socket_dir(), create=mode == "auto"):
            return None
        sock = connect()
        if sock is None and mode == "auto":
            start()
            sock = connect()
    except (paths.Insecure, WorkerError, OSError) as e:
        say(f"qimg: warning: {e}; running without the worker")
        return None
    if sock is None:
        return None
    with sock:
        return submit(sock, argv)


def submit(sock: socket.socket, argv: list[str]) -> int | None:
    """Send the job with this process's stdin, stdout and stderr, and wait for its exit code. Ctrl-C (and
    SIGTERM, SIGHUP) cancel it in the worker, which prints the usual line and exits 130 (143)."""
    message = job_message(argv)
    if message is None:
        return None
    cancelled = []

    def cancel(signum, _frame):
        cancelled.append(signum)
        try:
            send(sock, {"cancel": int(cancelled[-1])})
        except OSError:
            pass

    # the stopping signals cancel the job as they would stop an in-process run; ignored ones stay ignored
    previous = {s: signal.signal(s, cancel) for s in STOPS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        try:
            send(sock, message, (0, 1, 2))
        except OSError:
            return None
        messages, pid, started = Messages(sock), None, False
        while True:
            reply = messages.next()
            if reply is None:
                break
            if "refused" in reply:
                say(f"qimg: warning: not using the qimg worker: {reply['refused']}; running in-process "
                    f"(`qimg worker stop`, then start it from this environment)")
                return None
            if "queued" in reply:
                pid = reply["pid"]
                if reply["queued"]:
                    say(f"qimg: waiting for the worker: {reply['queued']} job(s) ahead")
            started = started or "started" in reply
            if "exit" in reply:
                if reply.get("dropped"):
                    say(f"qimg: {STOPS[reply['exit'] - 128]}; nothing written")
                return reply["exit"]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if not started:
        if cancelled:
            say(f"qimg: {STOPS[cancelled[0]]}; nothing written")
            return 128 + cancelled[0]
        return None
    say(f"qimg: error: the qimg worker (pid {pid}) stopped during the job; no partial file was written "
        f"(log: {paths.log_path()})")
    return 1
