"""The worker: `python -m qimg.worker.server --socket PATH --idle SECONDS` (started by `qimg worker start` or
QIMG_WORKER=auto). It is two processes, so that no job can wedge it:

- this one (the pid `qimg worker status` shows) runs no job code and imports no torch: an acceptor thread takes
  connections from this user only, at most MAX_CONNECTIONS at once, each of which must send its first message
  within FIRST_MESSAGE_TIMEOUT seconds, each message at most protocol.LIMIT bytes; a thread per connection
  answers ping, status and stop at once and queues jobs; the main thread hands the jobs, one at a time in
  arrival order, to
- the job process (runner.py), which imports torch and the model code, keeps the loaded model between jobs and
  re-runs each job's command line on its client's file descriptors, working directory, environment and umask.

A job may hold the job process's interpreter as long as it likes (a C loop that never lets go of the GIL, a
stuck device call): this process still answers status, queues jobs and takes cancels. A cancel goes to the job
process, which stops the job with the usual line; a job that has not ended CANCEL_GRACE seconds after its
cancel is ended by killing the job process (its loaded model goes with it; the next job starts a fresh one),
and its client gets the usual line. The job process dies with this one, so a worker killed mid-job leaves no
job running. A process forked per job, the other way to keep jobs apart, would keep a loaded model on the CPU
only (a CUDA context does not survive fork) and start torch's thread pools for every job."""

import argparse
import collections
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from qimg.errors import STOPS
from qimg.worker import paths
from qimg.worker.clients import Job, bind, close_all, differences, fixed_settings, peer_uid, send_quietly, tell
from qimg.worker.protocol import Messages, send, well_formed

HOME = "/"  # the worker's working directory
MAX_CONNECTIONS = 64  # open at once, queued and running jobs included; more are closed unread
FIRST_MESSAGE_TIMEOUT = 5.0  # seconds a connection has to send its first message
CANCEL_GRACE = 4.0  # seconds a cancelled job has to end before its process is killed
POLL = 0.25  # seconds between looks at signals and cancels while a job runs


def resident_bytes(pid: str) -> int:
    """A process's resident memory; 0 for one that has just ended."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
    except FileNotFoundError:
        return 0


class Worker:
    def __init__(self, listener: socket.socket, path: Path, idle: float, log: paths.Log):
        self.listener, self.path, self.idle, self.log = listener, path, idle, log
        self.jobs = collections.deque()
        self.current: Job | None = None
        self.cond = threading.Condition()  # around the queue, the current job and sends to the job process
        self.stopping = False
        self.born, self.last, self.jobs_run = time.time(), time.monotonic(), 0
        self.settings = fixed_settings(os.environ)
        self.terminated = False  # SIGTERM: stop once the current job is done (it is cancelled)
        self.signals = []  # the stopping signals this process got, for the main thread to pass to the job
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.ids = itertools.count(1)
        self.runner: subprocess.Popen | None = None
        self.channel: socket.socket | None = None
        self.replies: Messages | None = None
        self.loaded = None  # the job process's kept engine, as its last job left it

    def signalled(self, signum, _frame) -> None:
        """The stopping signals: the running job is cancelled with it; SIGTERM also stops the worker."""
        self.signals.append(signum)
        if signum == signal.SIGTERM:
            self.terminated = True

    # --- the acceptor and one thread per connection
    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed by stop
            if not self.slots.acquire(blocking=False):
                self.log(f"refused a connection: {MAX_CONNECTIONS} open already")
                conn.close()
                continue
            threading.Thread(target=self.talk, args=(conn,), daemon=True).start()

    def talk(self, conn: socket.socket) -> None:
        try:
            self.converse(conn)
        finally:
            self.slots.release()

    def converse(self, conn: socket.socket) -> None:
        messages = Messages(conn)
        try:
            if peer_uid(conn) != os.getuid():
                self.log(f"refused a connection from uid {peer_uid(conn)}")
                return conn.close()
            conn.settimeout(FIRST_MESSAGE_TIMEOUT)
            message = messages.next()
            conn.settimeout(None)
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
        except Exception as e:  # a client that went away mid-message, or sent too much or nothing: only the log
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
            try:
                message = messages.next()
            except (OSError, ValueError):  # a broken or oversized message: as if the client went away
                message = None
            if message is None or isinstance(message, dict) and "cancel" in message:
                signum = message["cancel"] if message else None
                self.cancel(job, signum if isinstance(signum, int) and signum in STOPS else signal.SIGINT)
            if message is None:
                return job.conn.close()

    @staticmethod
    def hang_up(conn: socket.socket, messages: Messages) -> None:
        """Close once the client has (at most 10 s): closing first could reset the connection before it reads
        the reply."""
        deadline = time.monotonic() + 10
        try:
            while (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)
                if messages.next() is None:
                    break
        except (OSError, ValueError):
            pass
        conn.close()

    def cancel(self, job: Job, signum: int) -> None:
        with self.cond:
            if job.cancelled is not None:
                return
            job.cancelled, job.cancelled_at = signum, time.monotonic()
            if job in self.jobs:
                self.jobs.remove(job)
                self.log(f"dropped a queued job ({signal.Signals(signum).name})")
                self.close_job(job, {"exit": 128 + signum, "dropped": True})
            elif job.running:
                self.log(f"cancelling the running job ({signal.Signals(signum).name})")
                try:
                    send(self.channel, {"cancel": signum, "id": job.id})
                except OSError:
                    pass  # the job process is gone: the main thread finds out

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
            runner = self.runner.pid if self.runner else None
            return dict(pid=os.getpid(), uptime=round(time.time() - self.born, 1), jobs_run=self.jobs_run,
                        busy=self.current is not None, queued=len(self.jobs), loaded=self.loaded,
                        memory=resident_bytes("self") + (resident_bytes(str(runner)) if runner else 0),
                        idle_exit=self.idle, socket=str(self.path), log=str(self.log.path), python=sys.executable)

    # --- the main thread
    def serve(self) -> None:
        while True:
            with self.cond:
                while not self.jobs or self.terminated:
                    left = self.idle - (time.monotonic() - self.last)
                    if self.stopping or self.terminated or left <= 0:
                        self.log("stopping" if self.stopping or self.terminated else f"idle for {self.idle:g} s, "
                                 "exiting")
                        return self.stop()
                    self.signals.clear()  # between jobs only SIGTERM counts (self.terminated)
                    self.cond.wait(min(left, 1.0))
                job = self.current = self.jobs.popleft()
                send_quietly(job.conn, {"started": True})
            self.log(f"job: {' '.join(job.message['argv'])}")
            started = time.monotonic()
            end = self.run(job)
            with self.cond:
                job.running = False
                self.current, self.last = None, time.monotonic()
                self.jobs_run += 1
                self.close_job(job, end)
            self.log(f"job done: exit {end['exit']} in {time.monotonic() - started:.2f} s")
            if self.terminated:
                self.log("terminated (SIGTERM) during a job, exiting; queued jobs run in their clients")
                return self.stop()

    def run(self, job: Job) -> dict:
        """Hand the job to the job process (started first if none runs) and wait for its end, passing on this
        process's signals as cancels; the message for the client."""
        if self.runner is None and not self.start_runner():
            tell(job, f"qimg: error: the qimg worker could not start its job process; see {self.log.path}, or run "
                      f"it with --no-worker")
            return {"exit": 1}
        with self.cond:  # a cancel from now on is sent after the job
            if job.cancelled is not None:
                return {"exit": 128 + job.cancelled, "dropped": True}
            job.id, job.running = next(self.ids), True
            send(self.channel, {**job.message, "id": job.id}, job.fds)
        while True:
            try:
                reply = self.reply(POLL)
            except TimeoutError:
                while self.signals:
                    self.cancel(job, self.signals.pop(0))
                if job.cancelled is None or time.monotonic() - job.cancelled_at < CANCEL_GRACE:
                    continue
                self.log(f"the job did not end within {CANCEL_GRACE:g} s of its cancel: killing its process "
                         f"{self.runner.pid} (the loaded model goes with it)")
                self.drop_runner(job, kill=True)
                return {"exit": 128 + job.cancelled, "dropped": True}
            if reply is None:
                code = self.drop_runner(job)
                how = f"signal {-code}" if code < 0 else f"exit {code}"
                self.log(f"the job process died during the job ({how})")
                tell(job, f"qimg: error: the qimg worker's job process died during the job ({how}); no partial "
                          f"file was written (log: {self.log.path})")
                return {"exit": 1}
            if reply.get("id") == job.id:
                self.loaded = reply["loaded"]
                return {"exit": reply["exit"]}

    def start_runner(self) -> bool:
        ours, theirs = socket.socketpair()
        with theirs:
            self.runner = subprocess.Popen(
                [sys.executable, "-m", "qimg.worker.runner", "--channel", str(theirs.fileno()),
                 "--parent", str(os.getpid())], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd=HOME)
        self.channel, self.replies = ours, Messages(ours)
        reply = self.reply(None)
        if reply is None or "ready" not in reply:
            self.log(f"the job process stopped while starting (exit {self.drop_runner(None, kill=True)})")
            return False
        self.log(f"job process {self.runner.pid} ready")
        return True

    def reply(self, timeout: float | None) -> dict | None:
        """The job process's next message (its log lines go to the log); None when it is gone; TimeoutError
        when none came within `timeout` seconds."""
        while True:
            message = self.replies.pop()
            if message is None:
                self.channel.settimeout(timeout)
                if not self.replies.receive():
                    return None
            elif "log" in message:
                self.log(f"job process: {message['log']}")
            else:
                return message

    def drop_runner(self, job: Job | None, kill: bool = False) -> int:
        """End the job process (it ends by itself once its channel closes); its exit code."""
        with self.cond:
            if job is not None:
                job.running = False  # no cancel goes to a closed channel
            runner, channel = self.runner, self.channel
            self.runner = self.channel = self.replies = self.loaded = None
        channel.close()
        if not kill:
            try:
                return runner.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        runner.kill()
        return runner.wait()

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


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m qimg.worker.server")
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--idle", type=float, required=True)
    args = p.parse_args()
    log = paths.Log(paths.log_path())
    threading.excepthook = lambda a: log(f"thread {a.thread.name}: {a.exc_type.__name__}: {a.exc_value}")
    os.chdir(HOME)  # not the folder it was started from, which may be deleted
    try:
        listener = bind(args.socket)
    except OSError as e:
        log(f"cannot listen on {args.socket}: {e.strerror}")
        sys.exit(1)
    worker = Worker(listener, args.socket, args.idle, log)
    for signum in STOPS:
        signal.signal(signum, worker.signalled)
    try:
        if not worker.start_runner():  # before the socket answers: `worker start` returns with torch loaded
            sys.exit(1)
        listener.listen(64)
        worker.last = time.monotonic()  # the idle time counts from here
        log(f"listening on {args.socket} (python {sys.executable}, idle exit {args.idle:g} s)")
        threading.Thread(target=worker.accept, name="acceptor", daemon=True).start()
        worker.serve()
    finally:
        worker.stop()
        listener.close()
        if worker.runner is not None:
            worker.drop_runner(None)


if __name__ == "__main__":
    main()
