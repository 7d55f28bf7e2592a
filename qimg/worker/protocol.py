"""What the worker's client and server say to each other over the per-user Unix socket: one JSON object per
line (at most LIMIT bytes), and the framing that carries file descriptors with a message (SCM_RIGHTS). The
worker and its job process (runner.py) talk the same way.

No job classes cross the socket: a job is the command's argv, run as the client would run it. The messages:

    client -> server   {"op": "ping" | "status" | "stop"}            answered by one reply, then hang up
                       job_message: {"op": "run", "argv", "cwd", "env", "umask", "streams"} with fds 0, 1, 2
                       {"cancel": signal number}                     while the job waits or runs
    server -> client   {"pid"} (ping, stop), the status object (status)
                       {"queued": jobs ahead, "pid"}, then {"started": true}, then {"exit": code}
                       ({"exit": 128 + signal, "dropped": true} for a job cancelled while queued, or ended
                       by killing its process: the client prints the usual line the job could not)
                       {"refused": why}: the client runs the job in-process

Imports only the standard library, like the client.
"""

import json
import os
import socket
import sys


def send(sock: socket.socket, message: dict, fds=()) -> None:
    """One message: a JSON line; `fds` (file descriptors) travel with its first bytes (SCM_RIGHTS)."""
    data = (json.dumps(message) + "\n").encode()
    sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
    sock.sendall(data[sent:])


LIMIT = 1 << 20  # bytes in one message: a job's argv and environment fit many times over


class Malformed(ValueError):
    """A message longer than the limit, or carrying more file descriptors than a job's three."""


class Messages:
    """The JSON lines arriving on a socket, and the file descriptors that came with them. Reading is linear in
    what arrives (one buffer, each byte scanned for the newline once) and a line longer than `limit` is refused
    once that many bytes came without one."""

    def __init__(self, sock: socket.socket, limit: int = LIMIT):
        self.sock, self.limit = sock, limit
        self.buffer, self.scanned, self.fds = bytearray(), 0, []

    def next(self) -> dict | None:
        """The next message, or None when the other side closed (or vanished)."""
        while (message := self.pop()) is None:
            if not self.receive():
                return None
        return message

    def pop(self) -> dict | None:
        """A message already received whole, else None."""
        end = self.buffer.find(b"\n", self.scanned)
        if end < 0:
            self.scanned = len(self.buffer)
            if self.scanned > self.limit:
                raise Malformed(f"a message over {self.limit} bytes")
            return None
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        self.scanned = 0
        if end > self.limit:
            raise Malformed(f"a message over {self.limit} bytes")
        try:
            return json.loads(line)
        except RecursionError:  # nested deeper than the parser goes: no message of ours
            raise Malformed("a message nested too deeply") from None

    def receive(self) -> bool:
        """Read what has arrived (waiting for something); False when the other side closed. A timeout set on
        the socket raises TimeoutError and loses nothing."""
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 3)
        except (ConnectionResetError, BrokenPipeError):
            return False
        self.fds += fds
        if len(self.fds) > 3:
            raise Malformed(f"{len(self.fds)} file descriptors")
        self.buffer += data
        return bool(data)


def job_message(argv: list[str]) -> dict | None:
    """What the worker needs to run the job as this process would: None when it cannot (a closed standard
    stream, a working directory that is gone), and the job runs in-process."""
    try:
        cwd = os.getcwd()
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return None
    umask = os.umask(0)
    os.umask(umask)
    streams = [dict(encoding=getattr(s, "encoding", None) or "utf-8", errors=getattr(s, "errors", None) or "strict")
               for s in (sys.stdin, sys.stdout, sys.stderr)]
    return dict(op="run", argv=argv, cwd=cwd, env=dict(os.environ), umask=umask, streams=streams)


def well_formed(message: dict) -> bool:
    """Whether a run message has job_message's shape (anything else is refused unread)."""
    types = dict(argv=list, cwd=str, env=dict, umask=int, streams=list)
    return all(isinstance(message.get(k), t) for k, t in types.items()) and len(message["streams"]) == 3 and all(
        isinstance(s, dict) and isinstance(s.get("encoding"), str) and isinstance(s.get("errors"), str)
        for s in message["streams"]) and all(isinstance(a, str) for a in message["argv"])
