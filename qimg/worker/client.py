"""The light side of the worker: decide whether a command goes to a worker, start one, submit a job and
relay its exit code. A job is sent as its argv with this process's standard streams (their file descriptors),
working directory, environment and umask (protocol.job_message); the worker re-runs the command line on them,
so no job classes cross the socket. Imports only the standard library (no torch, numpy, PIL or typer), so a
submitted job costs a bare Python start-up."""

import fcntl
import os
import select
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

MODEL_COMMANDS = ("generate", "inpaint", "outpaint", "edit", "chain", "mask")  # the others are quick in-process
SPREADING = ("--shard", "--ray")  # runs that divide a batch between processes: each runs its part itself, never
# queued behind the others in one worker (torchrun's ranks would take turns in it, on its one device)
TOGETHER = ("--cfg-parallel", "--ulysses", "--tp")  # one image on every rank of a torchrun: never in a worker
OFF = ("0", "false", "off", "no")  # QIMG_WORKER values that mean in-process
DEFAULT_IDLE = 600
READY_TIMEOUT = 120.0  # seconds a starting worker may take to import torch and listen
GRACE = 5.0  # seconds a cancelled job's worker has to answer before its client leaves without the answer


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
    with open(paths.open_private(paths.lock_path(), os.O_RDWR), "r+b") as f:
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
        clear(path)
        log = paths.log_path()
        with open(paths.open_private(log), "ab") as out:  # jobs' argv: yours
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


def clear(path) -> None:
    """Remove what is left at the socket path when nothing listens there (connect was refused or found no
    socket): a dead worker's socket, or any other file of this user's in the private folder (checked 0700 and
    this user's before). A folder, or another user's file, stays and is named."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise WorkerError(f"{path} is in the way of the worker's socket; remove it")
    os.unlink(path)


def maybe_submit(argv: list[str]) -> int | None:
    """Run a model command in the worker and return its exit code; None when it should run in-process:
    not a model command, --no-worker or QIMG_WORKER=0, --shard or --ray, the ranks of one image (--cfg-parallel,
    --ulysses, --tp), no worker running (QIMG_WORKER=auto
    starts one),
    or the worker could not be reached before the job started."""
    mode = os.environ.get("QIMG_WORKER", "1").strip().lower()
    if mode in OFF or "--no-worker" in argv or command_of(argv) not in MODEL_COMMANDS or spreads(argv) \
            or any(a.split("=", 1)[0] in TOGETHER for a in argv):
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
    SIGTERM, SIGHUP, SIGQUIT) cancel it in the worker, which prints the usual line and exits 130 (143). On a
    second signal, or GRACE seconds after the first without the worker's answer, the client leaves by itself
    with that line and code: a worker that cannot answer never holds the shell."""
    message = job_message(argv)
    if message is None:
        return None
    cancelled = []  # (signal, when)

    def cancel(signum, _frame):
        cancelled.append((signum, time.monotonic()))
        if len(cancelled) == 1:
            try:
                send(sock, {"cancel": int(signum)})
            except OSError:
                pass

    # the stopping signals cancel the job as they would stop an in-process run; ignored ones stay ignored. Each
    # also writes a byte to `wake`, so a wait for the worker's answer ends to look at the time.
    wake, woken = os.pipe()
    for fd in (wake, woken):
        os.set_blocking(fd, False)
    previous = {s: signal.signal(s, cancel) for s in STOPS if signal.getsignal(s) is not signal.SIG_IGN}
    previous_wakeup = signal.set_wakeup_fd(woken, warn_on_full_buffer=False)
    try:
        try:
            send(sock, message, (0, 1, 2))
        except OSError:
            return None
        messages, pid, started = Messages(sock), None, False
        while True:
            reply = messages.pop()
            if reply is None:
                left = cancelled[0][1] + GRACE - time.monotonic() if cancelled else None
                if len(cancelled) > 1 or left is not None and left <= 0:
                    break  # given up on the worker's answer
                ready = select.select([sock, wake], [], [], left)[0]
                if wake in ready:
                    os.read(wake, 1024)
                if sock in ready and not messages.receive():
                    break
                continue
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
        signal.set_wakeup_fd(previous_wakeup)
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(wake)
        os.close(woken)
    if cancelled:
        say(f"qimg: {STOPS[cancelled[0][0]]}; nothing written")
        return 128 + cancelled[0][0]
    if not started:
        return None
    say(f"qimg: error: the qimg worker (pid {pid}) stopped during the job; no partial file was written "
        f"(log: {paths.log_path()})")
    return 1
