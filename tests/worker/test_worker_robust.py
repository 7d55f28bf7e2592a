"""The worker against careless and hostile clients: started from a folder that is deleted later, cancels that race
the start and end of a job, malformed messages. It keeps running, leaks no descriptors and always tells the
client one line."""

import json
import os
import random
import socket
import time

import pytest
from worker_helpers import FAST, job, qimg, socket_path, start, status, stop, worker_env

from qimg.worker.protocol import Messages, send

pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = worker_env(tmp_path_factory.mktemp("robust"))
    yield env
    stop(env)


def settled_fds(pid: int, within: float = 10) -> int:
    """The worker's open descriptors once connections that are closing have closed (the count holds for 0.5 s)."""
    deadline, count = time.monotonic() + within, open_fds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        count, last = open_fds(pid), count
        if count == last:
            break
    return count


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_worker_started_in_a_deleted_folder_runs_jobs(env, tiny_model_dir, tmp_path):
    stop(env)
    gone_folder = tmp_path / "gone"
    gone_folder.mkdir()
    start(env, cwd=gone_folder)
    gone_folder.rmdir()
    result = qimg(["generate", "-p", "x", "-m", tiny_model_dir, "-o", "o.png", "--size", "16x16", *FAST], env,
                  cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "o.png").exists(), result.stderr
    assert status(env)["jobs_run"] == 1


def test_cancels_racing_a_job_never_stop_the_worker(env, tiny_model_dir, tmp_path, monkeypatch):
    pid = start(env)
    monkeypatch.setenv("QIMG_CACHE_DIR", os.environ["QIMG_CACHE_DIR"])
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    codes = []
    for i in range(20):  # fast jobs, each cancelled by SIGTERM or SIGINT at a random moment around its start
        signum = rng.choice((15, 2))
        null = os.open(os.devnull, os.O_RDWR)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(socket_path(env))
            send(sock, job(env, ["generate", "-p", "x", "-m", str(tiny_model_dir), "-o", f"{i}.png",
                                 "--size", "16x16", *FAST]), (null, null, null))
            os.close(null)
            messages = Messages(sock)
            while "started" not in messages.next():  # then cancel just after the job begins, or later in it
                pass
            time.sleep(rng.uniform(0, 0.02))
            send(sock, {"cancel": signum})
            reply = {}
            while reply is not None and "exit" not in reply:
                reply = messages.next()
        codes.append(reply and reply["exit"])
        assert os.path.exists(f"/proc/{pid}"), f"the worker stopped at job {i}"
    assert set(codes) <= {0, 130, 143} and None not in codes, codes
    assert status(env)["pid"] == pid


def test_malformed_messages_leak_nothing_and_broken_hand_overs_say_so(env, tiny_model_dir, tmp_path):
    pid = start(env)
    before = settled_fds(pid)
    for payload in (b"not json\n", b"[1, 2]\n", b'{"op": "run"}\n', b'{"op": "nope"}\n', b"\xff\xfe\n",
                    json.dumps(dict(op="run", argv="generate", cwd="/", env={}, umask=18,
                                    streams=[{"encoding": "utf-8", "errors": "strict"}] * 3)).encode() + b"\n"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(socket_path(env))
            socket.send_fds(sock, [payload], [0, 1, 2])
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            while sock.recv(1000):
                pass
    assert settled_fds(pid) == before
    # a job whose hand-over fails (an encoding the worker does not know) tells its client in one line
    message = job(env, ["generate", "-p", "x", "-m", str(tiny_model_dir), "-o", str(tmp_path / "o.png"), *FAST])
    message["streams"][2]["encoding"] = "no-such-codec"
    read, write = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(socket_path(env))
        send(sock, message, (null, null, write))
        os.close(write)
        os.close(null)
        messages, reply = Messages(sock), {}
        while reply is not None and "exit" not in reply:
            reply = messages.next()
    with os.fdopen(read) as stderr:
        err = stderr.read()
    assert reply["exit"] == 1 and err.startswith("qimg: error: the qimg worker could not run the job (LookupError)")
    assert err.count("\n") == 1 and not (tmp_path / "o.png").exists()
    assert settled_fds(pid) == before and status(env)["pid"] == pid


def test_a_cancel_before_the_run_takes_the_signals_still_stops_the_job(capsys):
    """The window a stress test rarely hits, made certain: the cancel came before the job's run took the signals
    (its signal reached the job process's own handler, which does nothing), so only runner.cancelled tells;
    the run must stop with the usual line. A cancel of another job is ignored."""
    from qimg.worker.runner import Runner, run_cancellable

    runner = Runner(channel=None)
    runner.job = {"id": 1}  # handed over, not yet running: the cancel sends no signal
    runner.cancel(2, 2)
    assert runner.cancelled is None
    runner.cancel(1, 15)
    assert run_cancellable(runner, ["generate", "-p", "x"]) == 143
    assert capsys.readouterr().err == "qimg: terminated; nothing written\n"
