"""--shard: which inputs a shard takes (stable hashes of names relative to the batch root, from I/N or the
environment of torchrun and Slurm arrays), and that the shards of a batch make exactly its outputs: byte for
byte, each file once, under torchrun too, and resumed after a kill with --skip-existing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qimg.errors import UsageError
from qimg.jobs import shard
from qimg.jobs.batch import named_inputs

ROOT = Path(__file__).resolve().parents[2]
FAST = ["-p", "a red circle", "--steps", "2", "--seed", "7", "--device", "cpu", "--no-cache"]


# --- which inputs a shard takes ----------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [("0/1", (0, 1)), ("2/3", (2, 3)), (" 1 / 4 ", (1, 4))])
def test_shard_values(value, expected):
    part = shard.parse(value, {})
    assert (part.index, part.count, str(part)) == (*expected, f"{expected[0]}/{expected[1]}")


@pytest.mark.parametrize("value, fragment", [("3/3", "index must be 0 to 2"), ("1/0", "at least 1"),
                                             ("1", "is not I/N"), ("-1/2", "is not I/N"), ("a/b", "is not I/N")])
def test_bad_shard_values(value, fragment):
    with pytest.raises(UsageError, match=fragment):
        shard.parse(value, {})


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, (3, 8, 3)),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, (0, 4, None)),
    # --array=1-4 counts from SLURM_ARRAY_TASK_MIN; --array=10-16:2 in its steps
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, (3, 4, None)),
    ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 4, None)),
    # torchrun inside each task of an array: every rank of every task its own shard
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
     (5, 6, 1)),
])
def test_auto_reads_torchrun_and_slurm(env, expected):
    part = shard.parse("auto", env)
    assert (part.index, part.count, part.local_rank) == expected


@pytest.mark.parametrize("env, fragment", [
    ({}, r"found neither RANK and WORLD_SIZE \(torchrun\) nor SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT"),
    ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
    ({"SLURM_ARRAY_TASK_COUNT": "2"}, "SLURM_ARRAY_TASK_COUNT is set but SLURM_ARRAY_TASK_ID is not"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not a whole number"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"\(RANK=2, WORLD_SIZE=2\): shards count from 0"),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"},
     "SLURM_ARRAY_TASK_ID 7 is past the 3 tasks"),
])
def test_auto_names_what_it_looked_for(env, fragment):
    with pytest.raises(UsageError, match=fragment):
        shard.parse("auto", env)


def test_shards_partition_the_names_and_new_names_move_none():
    names = [f"shot-{i:05d}.png" for i in range(600)]
    for n in (2, 3):
        parts = [shard.select(names, str, shard.Shard(i, n)) for i in range(n)]
        assert sorted(sum(parts, [])) == names  # every name in exactly one shard
        assert all(len(p) > 600 / n * 0.8 for p in parts)  # and roughly evenly
        more = names + [f"new-{i}.jpg" for i in range(300)]
        for i, part in enumerate(parts):
            assert [x for x in shard.select(more, str, shard.Shard(i, n)) if x in names] == part
    # sha256 of the name, not Python's per-process hash(): the same in every process and Python version
    assert shard.key("shot-00001.png") == 0xD066FD0BB5C118D4


def test_names_are_relative_to_the_batch_root(tmp_path, monkeypatch):
    for sub in ("day1", "day2"):
        (tmp_path / "shots" / sub).mkdir(parents=True)
        (tmp_path / "shots" / sub / "a.png").write_bytes(b"")
    (tmp_path / "shots" / "b.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    named, _ = named_inputs([Path("shots/*/*.png"), Path("shots"), Path("shots/b.png")])
    assert [name for _, name in named] == ["day1/a.png", "day2/a.png", "b.png"]
    assert [name for _, name in named_inputs([tmp_path / "shots" / "*" / "a.png"])[0]] == ["day1/a.png", "day2/a.png"]


@pytest.mark.parametrize("picked, local_rank, gpus, device", [
    ("cuda", 3, 8, "cuda:3"), ("cuda", 3, 1, "cuda:0"), ("cpu", 3, 0, "cpu"), ("cuda", None, 8, "cuda")])
def test_a_torchrun_rank_takes_its_own_gpu(picked, local_rank, gpus, device):
    assert shard.rank_device(picked, local_rank, gpus) == device


def test_sharded_runs_never_go_to_the_worker(monkeypatch):
    from qimg.worker import client

    monkeypatch.setenv("QIMG_WORKER", "auto")
    monkeypatch.setattr(client.paths, "check_dir", lambda *a, **k: pytest.fail("looked for a worker"))
    for extra in (["--shard", "0/2"], ["--shard=auto"], ["--ray", "auto"]):
        assert client.maybe_submit(["inpaint", "photos", "-p", "x", *extra]) is None


def test_a_result_line_is_written_at_once(monkeypatch):
    # torchrun's ranks share one stdout: a line written in two pieces (the text, then its newline) can have
    # another rank's line land between them, and `--json > results.jsonl` would not be JSON lines
    from qimg.jobs.report import print_result

    writes = []

    class Stdout:
        encoding = "utf-8"

        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Stdout())
    print_result('{"output": "a.png"}')
    assert writes == ['{"output": "a.png"}\n']


# --- the shards' outputs are the batch's -------------------------------------------------------------------


def make_photos(folder: Path, names, size=32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(folder / name)
    return folder


def outputs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def names_in(part: int, count: int, n: int, prefix="img") -> list[str]:
    """n file names that shard `part` of `count` takes."""
    return [name for name in (f"{prefix}{i}.png" for i in range(1000))
            if shard.key(name) % count == part][:n]


@pytest.mark.slow
def test_the_shards_make_the_batch_byte_for_byte(tmp_path, cli, one_thread):
    photos = make_photos(tmp_path / "photos", [f"p{i}.png" for i in range(7)])
    edit = ["inpaint", photos, "--rect", "8,8,16,16", *FAST, "--json"]
    assert cli.lines(*edit, "--out-dir", tmp_path / "all")[0] == 0
    whole = outputs(tmp_path / "all")
    assert len(whole) == 7
    for n in (2, 3):
        seen = []
        for i in range(n):
            code, lines, err = cli.lines(*edit, "--out-dir", tmp_path / f"n{n}", "--shard", f"{i}/{n}")
            assert code == 0 and f"qimg: shard {i}/{n}: {len(lines)} of 7 images" in err
            seen += [Path(r["output"]).name for r in lines]
        assert sorted(seen) == sorted(whole)  # no file in two shards, none left out
        assert outputs(tmp_path / f"n{n}") == whole


@pytest.mark.subprocess
def test_torchrun_gives_the_same_bytes_and_a_shard_s_bad_file_stops_no_other(tmp_path, cli, one_thread):
    # shard 0 of 2 takes three photos; shard 1 only a broken file, which fails at once: torchrun stops every
    # rank when one exits non-zero, so the failed rank must wait for the others (qimg/jobs/torchrun.py)
    good = names_in(0, 2, 4)
    photos = make_photos(tmp_path / "photos", good)
    bad = names_in(1, 2, 1, "broken")[0]
    (photos / bad).write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    edit = ["inpaint", photos, "--rect", "8,8,16,16", *FAST, "--steps", "24"]
    code, _, err = cli.lines(*edit, "--out-dir", tmp_path / "local")
    assert code == 1 and err.strip().endswith(f"1 of 5 images failed: {photos / bad}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QIMG_WORKER": "0"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "qimg", *map(str, edit), "--out-dir", tmp_path / "ranks", "--shard", "auto"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "qimg: shard 1/2: 1 of 5 images" in result.stderr
    assert "terminated" not in result.stderr, result.stderr
    assert outputs(tmp_path / "ranks") == outputs(tmp_path / "local") and len(outputs(tmp_path / "ranks")) == 4


@pytest.mark.subprocess
def test_a_killed_shard_resumes_with_skip_existing(tmp_path, cli, one_thread):
    mine = names_in(0, 2, 8)
    photos = make_photos(tmp_path / "photos", mine + names_in(1, 2, 2), size=64)
    edit = ["inpaint", photos, "--rect", "8,8,40,40", *FAST, "--steps", "12"]
    assert cli.lines(*edit, "--out-dir", tmp_path / "all")[0] == 0
    whole = outputs(tmp_path / "all")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QIMG_WORKER": "0", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "qimg", *map(str, edit), "--out-dir", out, "--shard", "0/2"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.inpaint.png")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {name: data for name, data in outputs(out).items() if name.endswith(".inpaint.png")}
    assert 0 < len(done) < len(mine)  # killed halfway
    assert all(whole[name] == data for name, data in done.items())  # no partial file under a final name
    code, lines, err = cli.lines(*edit, "--json", "--out-dir", out, "--shard", "0/2", "--skip-existing")
    assert code == 0, err
    assert sorted(Path(r["output"]).name for r in lines if r.get("skipped")) == sorted(done)
    assert sorted(Path(r["output"]).name for r in lines if "seed" in r) == sorted(
        f"{Path(n).stem}.inpaint.png" for n in mine if f"{Path(n).stem}.inpaint.png" not in done)  # none twice
    assert outputs(out) == {f"{Path(n).stem}.inpaint.png": whole[f"{Path(n).stem}.inpaint.png"] for n in mine}


@pytest.mark.parametrize("args, fragment", [
    (["inpaint", "PHOTOS/p0.png", "--rect", "0,0,8,8", "--ray", "local"], "--ray spreads a batch over actors"),
    (["inpaint", "PHOTOS", "--rect", "0,0,8,8", "--ray", "local", "--device", "cuda:1"],
     "--ray gives each actor one GPU of its own; --device cuda:1 cannot go with it"),
    (["outpaint", "PHOTOS", "--right", "16", "--ray", "auto", "--ray-workers", "2", "--device", "mps"],
     "--ray-workers runs actors on CPUs; --device mps cannot go with it"),
    (["inpaint", "PHOTOS", "--rect", "0,0,8,8", "--retries", "3"], "--retries goes with --ray ADDRESS"),
    (["inpaint", "PHOTOS", "--rect", "0,0,8,8", "--shard", "2/2"], "--shard 2/2: shards count from 0"),
])
def test_scale_usage_errors_come_before_any_work(tmp_path, cli, args, fragment):
    make_photos(tmp_path / "PHOTOS", ["p0.png", "p1.png"])
    code, lines, err = cli.lines(*[str(tmp_path / a) if a.startswith("PHOTOS") else a for a in args], "-p", "x")
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "PHOTOS").iterdir()) == ["p0.png", "p1.png"]
