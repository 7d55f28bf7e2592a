"""The worker's job process: `python -m qimg.worker.runner --channel FD --parent PID`, started by the worker
(server.py), which hands it one job at a time over a socket pair. It imports the command line, torch and the
model code once, keeps the engine a job loads for the next one (qimg.cli.in_worker), and re-runs each job's
argv on the job's file descriptors, working directory, environment and umask through `qimg.cli.app.run`, as
`qimg` would in-process. It dies with the worker (PR_SET_PDEATHSIG), so a worker killed mid-job leaves no job
running. Its messages (protocol.py's framing):

    worker -> runner   {"op": "run", "id", ...the client's job message} with the job's fds 0, 1, 2
                       {"cancel": signal number, "id"}
    runner -> worker   {"ready": pid} once imported, {"log": line}, {"exit": code, "id", "loaded": summary}
"""

import argparse
import ctypes
import io
import os
import signal
import socket
import sys
import threading
from queue import SimpleQueue

from qimg.cli import in_worker
from qimg.errors import STOPS, say
from qimg.worker import paths
from qimg.worker.protocol import Messages, send

HOME = "/"  # the working directory between jobs
PR_SET_PDEATHSIG = 1


class Runner:
    def __init__(self, channel: socket.socket):
        self.channel, self.jobs = channel, SimpleQueue()
        self.lock = threading.Lock()  # around the job's state below and every send on the channel
        self.job: dict | None = None
        self.running = False
        self.cancelled: int | None = None  # the signal a cancel of the current job asked for

    def tell(self, message: dict) -> None:
        with self.lock:
            send(self.channel, message)

    def read(self) -> None:
        """The reader thread: jobs go to the main thread, cancels are acted on at once."""
        messages = Messages(self.channel)
        while (message := messages.next()) is not None:
            if "cancel" in message:
                self.cancel(message["id"], message["cancel"])
            else:
                fds, messages.fds = messages.fds, []
                for fd in fds:
                    os.set_inheritable(fd, False)  # the job's own children inherit fds 0-2, not these
                self.jobs.put((message, fds))
        self.jobs.put(None)  # the worker closed the channel: exit

    def cancel(self, job_id: int, signum: int) -> None:
        with self.lock:
            if self.job is None or self.job["id"] != job_id or self.cancelled is not None:
                return
            self.cancelled = signum
            if self.running:
                signal.pthread_kill(threading.main_thread().ident, signum)

    def serve(self) -> None:
        while (item := self.jobs.get()) is not None:
            message, fds = item
            with self.lock:
                self.job, self.cancelled, self.running = message, None, True
            try:
                code = run_job(self, message, fds)
            except Exception as e:  # the hand-over itself failed: one line for the client, the details in the log
                self.tell({"log": f"job failed outside qimg: {type(e).__name__}: {e}"})
                write_line(fds[2], f"qimg: error: the qimg worker could not run the job ({type(e).__name__}); "
                                   f"see {paths.log_path()}, or run it with --no-worker")
                code = 1
            with self.lock:
                self.job, self.running = None, False
            for fd in fds:
                os.close(fd)
            self.tell({"exit": code, "id": message["id"], "loaded": in_worker.loaded()})


def write_line(fd: int, line: str) -> None:
    try:
        os.write(fd, f"{line}\n".encode())
    except OSError:
        pass


def run_job(runner: Runner, m: dict, fds: list) -> int:
    """Run the job as the client would in-process: its fds 0-1-2, streams with its encodings (stdout line
    buffered on a terminal), working directory, environment and umask; the runner's own come back after."""
    saved_fds = [os.dup(fd) for fd in (0, 1, 2)]
    saved_streams, saved_env = (sys.stdin, sys.stdout, sys.stderr), dict(os.environ)
    saved_umask = os.umask(0o022)
    try:
        os.umask(m["umask"] & 0o777)
        for fd, received in zip((0, 1, 2), fds):
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
        return run_cancellable(runner, m["argv"])
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


def run_cancellable(runner: Runner, argv: list[str]) -> int:
    """A cancel that arrives before the run takes the signals (or after it gave them back) reaches the runner's
    own handler, which does nothing: runner.cancelled still stops the run with the usual line."""
    from qimg.errors import Interrupted, signals_raise

    code = None
    try:
        with signals_raise():
            try:
                if runner.cancelled is not None:
                    raise Interrupted(runner.cancelled)
                code = in_worker.run(argv)
            except Interrupted as e:
                if code is None:
                    say(e.message())
                    code = e.code
    except Interrupted:
        pass  # as the handlers went back: the run had ended
    return 1 if code is None else code


def die_with(parent: int) -> None:
    """Be killed when the worker dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m qimg.worker.runner")
    p.add_argument("--channel", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args()
    die_with(args.parent)
    runner = Runner(socket.socket(fileno=args.channel))
    threading.excepthook = lambda a: runner.tell({"log": f"thread {a.thread.name}: {a.exc_type.__name__}: "
                                                         f"{a.exc_value}"})
    # Outside a job's run the stopping signals do nothing (the worker decides when this process ends). Not
    # SIG_IGN: a job's run keeps ignored signals ignored, and cancelling it is a signal sent to this thread.
    for signum in STOPS:
        signal.signal(signum, lambda *_: None)
    os.chdir(HOME)  # not the folder the worker was started from, which may be deleted
    in_worker.prepare()
    runner.tell({"ready": os.getpid()})
    threading.Thread(target=runner.read, name="reader", daemon=True).start()
    runner.serve()


if __name__ == "__main__":
    main()
