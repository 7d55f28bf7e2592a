"""--ray's checks that need no Ray installed: a bare --ray is a local cluster, which on a machine without a GPU
runs one actor per two cores on CPUs (said in a line); an address where nothing answers, or something that is no
Ray cluster, is a usage error (exit 2) in seconds, before Ray is imported."""

import socket
import time

import pytest
import torch
from helpers import one_line

from qimg.cli.app import bare_ray_is_local
from qimg.jobs import ray_runner
from qimg.jobs.spec import Edit, ModelSpec, Prompt, RaySpec


def test_a_bare_ray_means_a_local_cluster():
    assert bare_ray_is_local(["inpaint", "d/", "--ray"]) == ["inpaint", "d/", "--ray", "local"]
    assert bare_ray_is_local(["generate", "--ray", "--out-dir", "o"]) == [
        "generate", "--ray", "local", "--out-dir", "o"]
    assert bare_ray_is_local(["inpaint", "--ray", "auto", "d/"]) == ["inpaint", "--ray", "auto", "d/"]


def test_a_local_cluster_without_a_gpu_runs_an_actor_per_two_cores(monkeypatch):
    job = Edit((), Prompt("x"))
    monkeypatch.setattr(ray_runner.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    spec, note = ray_runner.cpu_actors(job, RaySpec("local"))
    assert spec == RaySpec("local", 4) and note == ("qimg: --ray local: no GPU here; 4 actor(s) on CPUs, one per two "
                                                    "cores (--ray-workers N to choose)")
    assert ray_runner.on_actors(job, spec).model.device == "cpu"
    monkeypatch.setattr(ray_runner.os, "cpu_count", lambda: 1)
    assert ray_runner.cpu_actors(job, RaySpec("local"))[0].workers == 1
    # what was asked for stays: a cluster's address, --ray-workers, a GPU device, a machine with a GPU
    for asked, on in [(RaySpec("auto"), job), (RaySpec("local", 2), job),
                      (RaySpec("local"), Edit((), Prompt("x"), model=ModelSpec(device="cuda")))]:
        assert ray_runner.cpu_actors(on, asked) == (asked, None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ray_runner.cpu_actors(job, RaySpec("local")) == (RaySpec("local"), None)


@pytest.fixture
def prompts(tmp_path):
    file = tmp_path / "p.txt"
    file.write_text("a red circle\n")
    return ["generate", "--prompts", file, "--out-dir", tmp_path, "--ray-workers", "2", "--ray"]


def test_an_address_where_nothing_answers_fails_at_once(prompts, cli, monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    code, _, err = cli(*prompts, f"127.0.0.1:{port}")
    assert code == 2 and time.monotonic() - started < 30, err
    one_line(err, f"--ray 127.0.0.1:{port}: nothing answers there")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # auto: the address $RAY_ADDRESS gives, checked alike
    code, _, err = cli(*prompts, "auto")
    assert code == 2, err
    one_line(err, f"--ray auto: nothing answers at $RAY_ADDRESS 127.0.0.1:{port}")


@pytest.mark.slow
def test_an_address_that_is_not_ray_fails_at_once(prompts, cli):
    """Something that accepts connections but is no gRPC server: refused in seconds, not after Ray's minutes
    of retries and warnings."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        started = time.monotonic()
        code, _, err = cli(*prompts, f"127.0.0.1:{port}")
    assert code == 2 and time.monotonic() - started < 30, err
    one_line(err, "is not a Ray cluster")
