"""The worker under faults: killed mid-job, two clients at once, Ctrl-C, an unsafe or stale socket, idle exit."""

import os
import signal
import socket
import stat
import time

import pytest
from worker_helpers import FAST, gone, qimg, start, status, stop, wait_for_log, worker_env

from qimg.worker import paths

pytestmark = pytest.mark.subprocess

# ~20 s on the tiny model with one thread (1000 CFG steps over 1024 tokens): a job still running when the test
# acts on it, however idle the machine
SLOW = ["--steps", "1000", "--size", "512x512", "--seed", "3", "--device", "cpu", "--cfg", "4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = worker_env(tmp_path_factory.mktemp("faults"))
    yield env
    stop(env)


def test_kill_9_during_sampling(env, tiny_model_dir, tmp_path):
    work = tmp_path / "work"  # beside the test's cache folder
    work.mkdir()
    pid = start(env)
    client = qimg(["generate", "-p", "x", "-m", tiny_model_dir, "-o", "out.png", *SLOW], env, cwd=work, wait=False)
    wait_for_log(env, "job: generate")
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    _, err = client.communicate(timeout=60)
    assert client.returncode == 1
    assert err == (f"qimg: error: the qimg worker (pid {pid}) stopped during the job; no partial file was written "
                   f"(log: {env['XDG_STATE_HOME']}/qimg/worker.log)\n")
    assert list(work.iterdir()) == []
    fast = ["generate", "-p", "x", "-m", tiny_model_dir, "-o", "out.png", "--size", "16x16", *FAST]
    result = qimg(fast, env, cwd=work)  # the stale socket is refused: in-process
    assert result.returncode == 0, result.stderr
    assert status(env) is None
    assert sorted(p.name for p in work.iterdir()) == ["out.png"]  # no temp file beside it
    result = qimg([*fast[:6], "again.png", *fast[7:]], env, cwd=work, mode="auto")  # a fresh worker
    assert result.returncode == 0, result.stderr
    answer = status(env)
    assert answer["pid"] != pid and answer["jobs_run"] == 1


def test_two_clients_run_one_after_the_other(env, tiny_model_dir, tmp_path):
    work = tmp_path / "work"  # beside the test's cache folder
    work.mkdir()
    start(env)
    first = qimg(["generate", "-p", "x", "-m", tiny_model_dir, "-o", "first.png", *SLOW[:1], "300", *SLOW[2:]], env,
                 cwd=work, wait=False)
    wait_for_log(env, "-o first.png")
    second = qimg(["generate", "-p", "y", "-m", tiny_model_dir, "-o", "second.png", "--size", "16x16", *FAST], env,
                  cwd=work)
    assert second.returncode == 0
    assert second.stderr.startswith("qimg: waiting for the worker: 1 job(s) ahead\n")
    assert first.wait(timeout=120) == 0
    assert (work / "first.png").stat().st_mtime <= (work / "second.png").stat().st_mtime


def test_ctrl_c_cancels_only_that_job(env, tiny_model_dir, tmp_path):
    work = tmp_path / "work"  # beside the test's cache folder
    work.mkdir()
    start(env)
    slow = qimg(["generate", "-p", "x", "-m", tiny_model_dir, "-o", "slow.png", *SLOW], env, cwd=work, wait=False)
    wait_for_log(env, "-o slow.png")
    queued = []
    for name in ("kept", "dropped"):  # one after the other, so they queue in this order
        queued.append(qimg(["generate", "-p", "y", "-m", tiny_model_dir, "-o", f"{name}.png", "--size", "16x16",
                            *FAST], env, cwd=work, wait=False))
        while status(env)["queued"] < len(queued):
            time.sleep(0.1)
    queued[1].send_signal(signal.SIGINT)
    assert queued[1].communicate(timeout=60)[1].endswith("qimg: interrupted; nothing written\n")
    slow.send_signal(signal.SIGINT)
    _, err = slow.communicate(timeout=60)
    assert (slow.returncode, err) == (130, "qimg: interrupted; nothing written\n")
    _, err = queued[0].communicate(timeout=120)
    assert queued[0].returncode == 0 and err.startswith("qimg: waiting for the worker: 1 job(s) ahead\n")
    assert queued[1].returncode == 130
    assert sorted(p.name for p in work.iterdir()) == ["kept.png"]
    assert status(env)["jobs_run"] >= 2  # still up


@pytest.mark.parametrize("make, words", [
    (lambda d: d.mkdir(mode=0o755) or os.chmod(d, 0o755), "has mode 0755, not 0700"),
    (lambda d: (d.parent / "elsewhere").mkdir(mode=0o700) or d.symlink_to(d.parent / "elsewhere"), "is a symlink"),
    (lambda d: d.write_text(""), "is not a directory"),
])
def test_an_unsafe_socket_folder_is_refused(tmp_path, tiny_model_dir, make, words):
    env = worker_env(tmp_path)
    make(tmp_path / "run" / "qimg")
    result = qimg(["worker", "start"], env)
    assert result.returncode == 2
    assert result.stderr.startswith("qimg: error: worker folder ") and words in result.stderr
    assert result.stderr.count("\n") == 1
    result = qimg(["generate", "-p", "x", "-m", tiny_model_dir, "--size", "16x16", *FAST], env, cwd=tmp_path,
                  mode="auto")
    assert result.returncode == 0 and result.stderr.startswith("qimg: warning: worker folder ")
    assert "running without the worker" in result.stderr


def test_a_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    (tmp_path / "qimg").mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(paths.Insecure, match="belongs to uid"):
        paths.check_dir(tmp_path / "qimg", create=False)


def test_a_new_folder_is_made_0700(tmp_path):
    old = os.umask(0)  # the folder is 0700 whatever the umask allows
    try:
        assert paths.check_dir(tmp_path / "qimg", create=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "qimg").st_mode) == 0o700


def test_a_stale_socket_is_replaced_and_idle_exit(tmp_path, monkeypatch):
    env = worker_env(tmp_path)
    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    paths.check_dir(paths.socket_dir(), create=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(paths.socket_path()))  # a socket file nobody listens on: a dead worker's
    dead.close()
    pid = start(env, idle=2)
    assert stat.S_IMODE(os.stat(paths.socket_path()).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(f"{env['XDG_STATE_HOME']}/qimg/worker.log").st_mode) == 0o600  # jobs' argv
    gone(pid, within=15)
    assert not paths.socket_path().exists() and status(env) is None


def test_sigterm_to_the_worker_ends_the_job_and_the_worker(env, tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    pid = start(env)
    client = qimg(["generate", "-p", "x", "-m", tiny_model_dir, "-o", "t.png", *SLOW], env, cwd=work, wait=False)
    wait_for_log(env, "-o t.png")
    os.kill(pid, signal.SIGTERM)
    _, err = client.communicate(timeout=60)
    assert (client.returncode, err) == (143, "qimg: terminated; nothing written\n")
    gone(pid)
    assert list(work.iterdir()) == [] and status(env) is None


def test_two_clients_racing_to_auto_start_make_one_worker(tmp_path, tiny_model_dir):
    env = worker_env(tmp_path)
    try:
        clients = [qimg(["generate", "-p", "x", "-m", tiny_model_dir, "--size", "16x16", "-o", f"{i}.png", *FAST],
                        env, cwd=tmp_path, mode="auto", wait=False) for i in range(2)]
        assert [c.wait(timeout=120) for c in clients] == [0, 0]
        log = (tmp_path / "state" / "qimg" / "worker.log").read_text()
        assert log.count("listening on") == 1 and log.count("job done: exit 0") == 2
    finally:
        stop(env)


def test_a_symlinked_log_is_not_followed(tmp_path, tiny_model_dir):
    """With XDG_STATE_HOME in a folder someone else controls (as sudo may leave it), a link at the log's place
    must not make the worker write where it points."""
    env = worker_env(tmp_path)
    target = tmp_path / "not-the-log.txt"
    target.write_text("keep\n")
    os.chmod(target, 0o644)
    (tmp_path / "state" / "qimg").mkdir(parents=True)
    (tmp_path / "state" / "qimg" / "worker.log").symlink_to(target)
    result = qimg(["worker", "start"], env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"qimg: error: worker file {tmp_path}/state/qimg/worker.log cannot be opened")
    result = qimg(["generate", "-p", "x", "-m", tiny_model_dir, "--size", "16x16", *FAST], env, cwd=tmp_path,
                  mode="auto")
    assert result.returncode == 0 and "running without the worker" in result.stderr
    assert target.read_text() == "keep\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert status(env) is None


def test_state_files_are_private_regular_files_of_this_user(tmp_path, monkeypatch):
    old = os.umask(0)
    try:
        log = paths.Log(tmp_path / "state" / "qimg" / "worker.log")
    finally:
        os.umask(old)
    log("a line")
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(log.path.parent).st_mode) == 0o700
    os.mkfifo(tmp_path / "fifo")  # never waited on
    with pytest.raises(paths.Insecure, match="fifo cannot be opened"):
        paths.open_private(tmp_path / "fifo")
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(paths.Insecure, match="worker folder .* belongs to uid"):
        paths.open_private(log.path)


def test_a_file_at_the_socket_path_is_replaced_a_folder_named(tmp_path, monkeypatch):
    env = worker_env(tmp_path)
    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    paths.check_dir(paths.socket_dir(), create=True)
    paths.socket_path().mkdir()
    result = qimg(["worker", "start"], env)
    assert (result.returncode, result.stderr) == (
        1, f"qimg: error: {paths.socket_path()} is in the way of the worker's socket; remove it\n")
    paths.socket_path().rmdir()
    paths.socket_path().write_text("not a socket")
    try:
        pid = start(env)
        assert stat.S_ISSOCK(os.lstat(paths.socket_path()).st_mode) and status(env)["pid"] == pid
    finally:
        stop(env)
