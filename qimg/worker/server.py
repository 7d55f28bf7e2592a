"""The worker process: `python -m qimg.worker.server --socket PATH --idle SECONDS` (started by
`qimg worker start` or QIMG_WORKER=auto). An acceptor thread takes connections from this user only and
queues jobs; the main thread runs them one at a time, in arrival order. A job is a client's argv and its
standard streams' file descriptors (protocol.py): the server re-runs the command line on them, with the
client's working directory, environment and umask, through `qimg.cli.app.run` as `qimg` would in-process
(qimg.cli.in_worker, which also keeps the engine between jobs). No job classes cross the socket."""

import argparse
import collections
import io
import os
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qimg.cli import in_worker
from qimg.errors import STOPS, say
from qimg.worker import paths
from qimg.worker.protocol import Messages, send, well_formed

HOME = "/"  # the worker's working directory between jobs


@dataclass(eq=False)
class Job:
    conn: socket.socket
    message: dict
    fds: list
    running: bool = False
    cancelled: int | None = None  # the signal a cancel asked for


class Log:
    """The worker's log, appended to by line; past `limit` bytes it moves to `<name>.1` (replacing the one
    before), so a worker left running for months keeps at most twice that on disk."""

    def __init__(self, path: Path, limit: int = 1 << 20):
        self.path, self.limit = path, limit
        self.lock = threading.Lock()
        self.file = self._open()

    def _open(self):
        return open(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", buffering=1,
                    encoding="utf-8")

    def __call__(self, message: str) -> None:
        with self.lock:
            if os.fstat(self.file.fileno()).st_size > self.limit:
                self.file.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self.file = self._open()
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}\n")


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


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class Worker:
    def __init__(self, listener: socket.socket, path: Path, idle: float, log: Log):
        self.listener, self.path, self.idle, self.log = listener, path, idle, log
        self.jobs = collections.deque()
        self.current: Job | None = None
        self.cond = threading.Condition()
        self.stopping = False
        self.born, self.last, self.jobs_run = time.time(), time.monotonic(), 0
        self.settings = fixed_settings(os.environ)
        self.terminated = False  # SIGTERM outside a job's run: stop once the current job is done

    def signalled(self, signum, _frame) -> None:
        """The worker's own handler for the stopping signals, outside a job's run (which turns them into its
        stop): a cancel that lands there is caught by run_job from job.cancelled; SIGTERM stops the worker."""
        if signum == signal.SIGTERM and (self.current is None or self.current.cancelled != signal.SIGTERM):
            self.terminated = True

    # --- the acceptor and one thread per connection
    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed by stop
            threading.Thread(target=self.talk, args=(conn,), daemon=True).start()

    def talk(self, conn: socket.socket) -> None:
        messages = Messages(conn)
        try:
            if peer_uid(conn) != os.getuid():
                self.log(f"refused a connection from uid {peer_uid(conn)}")
                return conn.close()
            message = messages.next()
            op = message.get("op") if isinstance(message, dict) else None
            if op == "run" and well_formed(message):
                for fd in messages.fds:
                    os.set_inheritable(fd, False)  # the job's own children inherit fds 0-2, not these
                return self.follow(Job(conn, message, messages.fds), messages)
            close_all(messages.fds)
            if op == "ping":
                send(conn, {"pid": os.getpid()})
            elif op == "status":
                send(conn, self.status())
            elif op == "stop":
                self.log("stop requested")
                self.stop()
                send(conn, {"pid": os.getpid()})
            self.hang_up(conn, messages)
        except Exception as e:  # a client that went away mid-message: nothing to tell anyone but the log
            self.log(f"connection: {type(e).__name__}: {e}")
            close_all(messages.fds)
            conn.close()

    def follow(self, job: Job, messages: Messages) -> None:
        """Queue the job, then wait for a cancel or the client going away (both cancel)."""
        changed = differences(self.settings, fixed_settings(job.message["env"]))
        with self.cond:
            refused = "stopping" if self.stopping else f"{len(job.fds)} fds" if len(job.fds) != 3 else changed
            if not refused:
                send(job.conn, {"queued": len(self.jobs) + (self.current is not None), "pid": os.getpid()})
                self.jobs.append(job)
                self.cond.notify()
        if refused:  # the client runs the job in-process
            self.log(f"refused a job: {refused}")
            for fd in job.fds:
                os.close(fd)
            if refused is changed:  # worth a warning: the worker will not take this client's jobs
                send_quietly(job.conn, {"refused": f"it was started with other {', '.join(changed)}"})
            return self.hang_up(job.conn, messages)
        while True:
            message = messages.next()
            if message is None or "cancel" in message:
                self.cancel(job, message["cancel"] if message and message["cancel"] in STOPS else signal.SIGINT)
            if message is None:
                return job.conn.close()

    @staticmethod
    def hang_up(conn: socket.socket, messages: Messages) -> None:
        """Close once the client has: closing first could reset the connection before it reads the reply."""
        conn.settimeout(10)
        try:
            while messages.next() is not None:
                pass
        except OSError:
            pass
        conn.close()

    def cancel(self, job: Job, signum: int) -> None:
        with self.cond:
            if job.cancelled is not None:
                return
            job.cancelled = signum
            if job in self.jobs:
                self.jobs.remove(job)
                self.log(f"dropped a queued job ({signal.Signals(signum).name})")
                self.close_job(job, {"exit": 128 + signum, "dropped": True})
            elif job.running:
                self.log(f"cancelling the running job ({signal.Signals(signum).name})")
                signal.pthread_kill(threading.main_thread().ident, signum)

    def stop(self) -> None:
        """Take no more jobs (the socket goes at once, so new commands run in-process); finish the queue."""
        with self.cond:
            if not self.stopping:
                self.stopping = True
                self.unlink()
                try:
                    self.listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor
                except OSError:
                    pass
                self.cond.notify()

    def status(self) -> dict:
        with self.cond:
            return dict(pid=os.getpid(), uptime=round(time.time() - self.born, 1), jobs_run=self.jobs_run,
                        busy=self.current is not None, queued=len(self.jobs), loaded=in_worker.loaded(),
                        memory=resident_bytes(), idle_exit=self.idle, socket=str(self.path),
                        log=str(self.log.path), python=sys.executable)

    # --- the main thread
    def serve(self) -> None:
        while True:
            with self.cond:
                while not self.jobs:
                    left = self.idle - (time.monotonic() - self.last)
                    if self.stopping or self.terminated or left <= 0:
                        self.log("stopping" if self.stopping or self.terminated else f"idle for {self.idle:g} s, "
                                 "exiting")
                        return self.stop()
                    self.cond.wait(min(left, 1.0))
                job = self.current = self.jobs.popleft()
                job.running = True
                send_quietly(job.conn, {"started": True})
            self.log(f"job: {' '.join(job.message['argv'])}")
            started = time.monotonic()
            try:
                code = run_job(job)
            except Exception as e:  # the hand-over itself failed: one line for the client, the details in the log
                self.log(f"job failed outside qimg: {type(e).__name__}: {e}")
                tell(job, f"qimg: error: the qimg worker could not run the job ({type(e).__name__}); see "
                          f"{self.log.path}, or run it with --no-worker")
                code = 1
            with self.cond:
                job.running = False
                self.current, self.last = None, time.monotonic()
                self.jobs_run += 1
                self.close_job(job, {"exit": code})
            self.log(f"job done: exit {code} in {time.monotonic() - started:.2f} s")
            if self.terminated or code == 128 + signal.SIGTERM and job.cancelled != signal.SIGTERM:
                self.log("terminated (SIGTERM) during a job, exiting; queued jobs run in their clients")
                return self.stop()

    def close_job(self, job: Job, message: dict) -> None:
        send_quietly(job.conn, message)
        for fd in job.fds:
            os.close(fd)
        job.fds = []

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


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


def run_job(job: Job) -> int:
    """Run the job as the client would in-process: its fds 0-1-2, streams with its encodings (stdout line
    buffered on a terminal), working directory, environment and umask; the worker's own come back after.
    A cancel that arrives before the job's run takes the signals (or after it gave them back) still stops
    it with the usual line, never the worker."""
    m = job.message
    saved_fds = [os.dup(fd) for fd in (0, 1, 2)]
    saved_streams, saved_env = (sys.stdin, sys.stdout, sys.stderr), dict(os.environ)
    saved_umask = os.umask(0o022)
    try:
        os.umask(m["umask"] & 0o777)
        for fd, received in zip((0, 1, 2), job.fds):
            os.dup2(received, fd)
        sys.stdin, sys.stdout, sys.stderr = (
            io.TextIOWrapper(open(fd, mode, closefd=False), s["encoding"], s["errors"], line_buffering=lines)
            for fd, mode, s, lines in zip((0, 1, 2), ("rb", "wb", "wb"), m["streams"], (False, os.isatty(1), True)))
        os.environ.clear()
        os.environ.update(m["env"])
        try:
            os.chdir(m["cwd"])
        except OSError as e:
            say(f"qimg: error: working directory {m['cwd']}: {e.strerror}")
            return 1
        return run_cancellable(job)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((0, 1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(HOME)
        os.umask(saved_umask)


def run_cancellable(job: Job) -> int:
    from qimg.errors import Interrupted, say, signals_raise

    code = None
    try:
        with signals_raise():  # from here a cancel raises; one that came before is in job.cancelled
            try:
                if job.cancelled is not None:
                    raise Interrupted(job.cancelled)
                code = in_worker.run(job.message["argv"])
            except Interrupted as e:
                if code is None:
                    say(e.message())
                    code = e.code
    except Interrupted:
        pass  # as the handlers went back: the run had ended
    return 1 if code is None else code


def listen(path: Path) -> socket.socket:
    """The worker's socket, 0600 from the start (bound under umask 0177)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(umask)
    listener.listen(64)
    return listener


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m qimg.worker.server")
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--idle", type=float, required=True)
    args = p.parse_args()
    log = Log(paths.log_path())
    threading.excepthook = lambda a: log(f"thread {a.thread.name}: {a.exc_type.__name__}: {a.exc_value}")
    in_worker.prepare()
    # Outside a job's run the worker's own handler takes the stopping signals (Worker.signalled). Not SIG_IGN:
    # a job's run keeps ignored signals ignored, and cancelling it is a signal sent to this thread.
    os.chdir(HOME)  # not the folder it was started from, which may be deleted
    listener = listen(args.socket)
    worker = Worker(listener, args.socket, args.idle, log)
    for signum in STOPS:
        signal.signal(signum, worker.signalled)
    log(f"listening on {args.socket} (python {sys.executable}, idle exit {args.idle:g} s)")
    threading.Thread(target=worker.accept, name="acceptor", daemon=True).start()
    try:
        worker.serve()
    finally:
        worker.stop()
        listener.close()


if __name__ == "__main__":
    main()
