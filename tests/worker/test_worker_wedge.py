"""Nothing wedges the worker or its clients: a job that holds its interpreter in a C loop (as a pathological
regular expression does), a worker that never answers, connections that send too much, nothing, or too many.
Every wait here has a timeout, so a regression fails instead of hanging."""

import os
import re
import signal
import socket
import threading
import time

import pytest
from worker_helpers import FAST, job, qimg, socket_path, start, worker_env

from qimg.worker import paths
from qimg.worker.protocol import Malformed, Messages, send
from qimg.worker.server import CANCEL_GRACE, FIRST_MESSAGE_TIMEOUT, MAX_CONNECTIONS

pytestmark = pytest.mark.subprocess

# Loaded by every Python the worker starts: in its job process, the job `hang` runs a regular expression that
# backtracks for ages without ever letting go of the GIL or looking at signals.
HOOK = """
import sys
if "--channel" in sys.argv:
    import re
    from qimg.cli import in_worker
    real = in_worker.run
    def run(argv):
        if argv == ["hang"]:
            re.match(r"(a+)+$", "a" * 64 + "b")
        return real(argv)
    in_worker.run = run
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wedge")
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(HOOK)
    env = worker_env(root)
    env["PYTHONPATH"] = f"{root / 'hook'}{os.pathsep}{env['PYTHONPATH']}"
    yield env
    for pid in re.findall(r"\[(\d+)\] listening on", (root / "state" / "qimg" / "worker.log").read_text()):
        try:  # a worker a regression wedged is killed, not waited for
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def ask(env, message: dict) -> dict | None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(socket_path(env))
        send(sock, message)
        return Messages(sock).next()


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_a_job_holding_the_interpreter_wedges_nothing(env, tiny_model_dir, tmp_path):
    pid = start(env)
    [runner] = children(pid)
    null = os.open(os.devnull, os.O_RDWR)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(socket_path(env))
        send(sock, job(env, ["hang"]), (null, null, null))
        os.close(null)
        messages = Messages(sock)
        while "started" not in messages.next():
            pass
        time.sleep(0.5)  # into the regular expression
        answer = ask(env, {"op": "status"})
        assert answer["busy"] and answer["pid"] == pid
        send(sock, {"cancel": signal.SIGINT})
        cancelled = time.monotonic()
        assert messages.next() == {"exit": 130, "dropped": True}  # the client prints the usual line
        assert time.monotonic() - cancelled < CANCEL_GRACE + 5
    assert children(pid) == [] and not os.path.exists(f"/proc/{runner}")  # nothing left spinning
    result = qimg(["generate", "-p", "x", "-m", tiny_model_dir, "-o", "o.png", "--size", "16x16", *FAST], env,
                  cwd=tmp_path)  # the next job gets a fresh job process
    assert result.returncode == 0 and (tmp_path / "o.png").exists(), result.stderr
    answer = ask(env, {"op": "status"})
    assert answer["pid"] == pid and answer["jobs_run"] == 2 and not answer["busy"]
    # a real client (its own code: the command line would refuse `hang` before sending it), stopped by SIGTERM
    code = "import sys; from qimg.worker.client import submit, connect; sys.exit(submit(connect(), ['hang']))"
    client = qimg_python(code, env, tmp_path)
    wait_for_job(env)
    client.send_signal(signal.SIGTERM)
    _, err = client.communicate(timeout=CANCEL_GRACE + 20)
    assert (client.returncode, err) == (143, "qimg: terminated; nothing written\n")
    assert ask(env, {"op": "status"})["jobs_run"] == 3


def qimg_python(code: str, env: dict, cwd):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_job(env, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not ask(env, {"op": "status"})["busy"]:
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.1)
    time.sleep(0.5)


@pytest.mark.parametrize("signals, within", [(1, (4, 12)), (2, (0, 3))])
def test_a_client_leaves_a_worker_that_never_answers(tmp_path, monkeypatch, signals, within):
    """After a second signal at once, after the grace period otherwise: the usual line and exit code."""
    env = worker_env(tmp_path)
    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    paths.check_dir(paths.socket_dir(), create=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(paths.socket_path()))
    listener.listen()
    got_job = threading.Event()

    def mute_worker():
        conn, _ = listener.accept()
        messages = Messages(conn)
        messages.next()
        for fd in messages.fds:  # the client's stdout and stderr: the test reads them to their end
            os.close(fd)
        send(conn, {"queued": 0, "pid": 1})
        send(conn, {"started": True})
        got_job.set()
        while messages.next() is not None:  # cancels, never answered
            pass

    threading.Thread(target=mute_worker, daemon=True).start()
    client = qimg(["generate", "-p", "x", "-o", "o.png"], env, cwd=tmp_path, wait=False)
    assert got_job.wait(60)
    begun = time.monotonic()
    for _ in range(signals):
        client.send_signal(signal.SIGINT)
        time.sleep(0.2)
    _, err = client.communicate(timeout=30)
    assert (client.returncode, err) == (130, "qimg: interrupted; nothing written\n")
    assert within[0] <= time.monotonic() - begun <= within[1]
    listener.close()


def test_connections_that_send_too_much_nothing_or_too_many_are_closed(env):
    start(env)
    with socket.socket(socket.AF_UNIX) as sock:  # 4 MB without a newline: closed past the limit
        sock.settimeout(20)
        sock.connect(socket_path(env))
        with pytest.raises(OSError):  # the worker closed it while we sent
            sock.sendall(b"x" * (4 << 20))
    begun = time.monotonic()
    with socket.socket(socket.AF_UNIX) as sock:  # nothing: closed after the first message's timeout
        sock.settimeout(FIRST_MESSAGE_TIMEOUT + 10)
        sock.connect(socket_path(env))
        assert sock.recv(10) == b""
    assert FIRST_MESSAGE_TIMEOUT - 1 < time.monotonic() - begun < FIRST_MESSAGE_TIMEOUT + 5
    idle = [socket.socket(socket.AF_UNIX) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in idle:
            sock.connect(socket_path(env))
        time.sleep(1)  # all accepted
        with socket.socket(socket.AF_UNIX) as sock:  # one too many: closed at once
            sock.settimeout(FIRST_MESSAGE_TIMEOUT - 2)
            sock.connect(socket_path(env))
            assert sock.recv(10) == b""
    finally:
        for sock in idle:
            sock.close()
    time.sleep(1)
    assert ask(env, {"op": "status"})["queued"] == 0  # the worker answers again
    log = (paths.Path(env["XDG_STATE_HOME"]) / "qimg" / "worker.log").read_text()
    assert "a message over 1048576 bytes" in log and f"{MAX_CONNECTIONS} open already" in log


def test_the_message_reader_is_linear_and_bounded():
    """64 MB without a newline once cost 7.7 s of CPU (the buffer copied and rescanned per read); now it reads
    in one pass, and past the limit it stops reading."""
    def feed(size: int, limit: int):
        ours, theirs = socket.socketpair()

        def write():
            with theirs:
                try:
                    theirs.sendall(b"[" + b" " * size + b"]\n")
                except BrokenPipeError:  # the reader stopped at the limit
                    pass

        threading.Thread(target=write, daemon=True).start()
        ours.settimeout(30)
        try:
            return Messages(ours, limit=limit).next()
        finally:
            ours.close()

    begun = time.process_time()
    assert feed(64 << 20, 128 << 20) == []
    assert time.process_time() - begun < 3
    with pytest.raises(Malformed, match="a message over 1048576 bytes"):
        feed(4 << 20, 1 << 20)
