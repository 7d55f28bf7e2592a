"""generate --prompts FILE: one image per entry (text lines, JSONL, YAML; per-entry seed, size and negative
prompt), <n>-<slug>.png names, resumable and shardable as a folder batch; a bad file refused up front with
its line named."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qimg.jobs.batch import name_seed
from qimg.jobs.metadata import read_params
from qimg.jobs.prompts_file import slug

FAST = ["--steps", "2", "--device", "cpu", "--no-cache", "--size", "32x32", "--json"]


def test_slugs():
    assert slug("A red  Circle, on WHITE!") == "a-red-circle-on-white"
    assert slug("一只猫 in a hat") == "一只猫-in-a-hat"
    assert slug("x" * 50) == "x" * 40 and slug("a " + "y" * 45) == "a"
    assert slug("!!!") == ""


@pytest.mark.slow
def test_a_prompts_file_makes_one_image_per_entry(tmp_path, cli, one_thread):
    file = tmp_path / "prompts.jsonl"
    file.write_text('"a red circle"\n\n{"prompt": "a blue square", "seed": 5, "size": "48x32", '
                    '"negative_prompt": "green"}\n{"prompt": "!!!"}\n')
    out = tmp_path / "out"
    code, lines, err = cli.lines("generate", "--prompts", file, "--out-dir", out, "--seed", "7", *FAST)
    assert code == 0, err
    names = ["0001-a-red-circle.png", "0003-a-blue-square.png", "0004.png"]
    assert [Path(r["output"]).name for r in lines] == names == sorted(p.name for p in out.iterdir())
    first, second, third = (read_params(out / n) for n in names)
    assert first["seed"] == name_seed(7, names[0]) and third["seed"] == name_seed(7, names[2])
    assert (second["seed"], second["negative_prompt"], second["prompt"]) == (5, "green", "a blue square")
    assert Image.open(out / names[1]).size == (48, 32) and Image.open(out / names[0]).size == (32, 32)

    # resumable: an existing output refuses the batch up front, --skip-existing skips it
    (out / names[1]).unlink()
    code, _, err = cli.lines("generate", "--prompts", file, "--out-dir", out, "--seed", "7", *FAST)
    assert code == 2 and "2 of 3 outputs exist already" in err and not (out / names[1]).exists()
    code, lines, _ = cli.lines("generate", "--prompts", file, "--out-dir", out, "--seed", "7", *FAST,
                               "--skip-existing")
    assert code == 0 and [bool(r.get("skipped")) for r in lines] == [True, False, True]
    assert read_params(out / names[1]) == second

    # shardable: the two shards make the same files
    for i in (0, 1):
        assert cli.lines("generate", "--prompts", file, "--out-dir", tmp_path / "sh", "--seed", "7", *FAST,
                         "--shard", f"{i}/2")[0] == 0
    assert {n: (tmp_path / "sh" / n).read_bytes() for n in names} == {n: (out / n).read_bytes() for n in names}


@pytest.mark.slow
def test_an_output_that_appears_meanwhile_fails_only_its_entry(tmp_path, cli, monkeypatch, one_thread):
    from qimg.jobs import generate as generating

    file = tmp_path / "p.txt"
    file.write_text("one\ntwo\nthree\n")
    real = generating.generate

    def first_makes_the_second(job, reporter):  # another program writes entry 2's output while entry 1 runs
        (tmp_path / "0002-two.png").write_bytes(b"theirs")
        return real(job, reporter)

    monkeypatch.setattr(generating, "generate", first_makes_the_second)
    code, lines, err = cli.lines("generate", "--prompts", file, "--out-dir", tmp_path, *FAST)
    assert code == 1 and [Path(r["output"]).name for r in lines if "output" in r] == ["0001-one.png", "0003-three.png"]
    assert (tmp_path / "0002-two.png").read_bytes() == b"theirs"
    assert f"qimg: error: {file} line 2: output {tmp_path / '0002-two.png'} exists" in err
    assert err.strip().splitlines()[-1] == f"qimg: error: 1 of 3 prompts failed: {file} line 2"


@pytest.mark.slow
def test_yaml_prompts(tmp_path, cli, one_thread):
    file = tmp_path / "p.yaml"
    file.write_text("- a red circle\n- prompt: a blue square\n  seed: 3\n")
    code, lines, err = cli.lines("generate", "--prompts", file, "--out-dir", tmp_path, *FAST)
    assert code == 0, err
    assert [Path(r["output"]).name for r in lines] == ["0001-a-red-circle.png", "0002-a-blue-square.png"]
    assert lines[1]["seed"] == 3


@pytest.mark.parametrize("name, content, fragment", [
    ("p.txt", b"a cat\n\xff\xfe dog\nok\n", "p.txt line 2: not UTF-8 text"),
    ("p.jsonl", b'"a"\n{"prompt": "b", "sede": 3}\n{oops\n[1]\n',
     "p.jsonl line 2: unknown key 'sede' (known: prompt, seed, size, negative_prompt) (and 2 more: line 3, line 4)"),
    ("p.jsonl", b'"a"\n{oops\n', "line 2: not valid JSON (Expecting property name enclosed in double quotes)"),
    ("p.jsonl", b'{"prompt": "b", "seed": -1}\n', "line 1: seed -1 is not a whole number from 0 to 2^63-1"),
    ("p.jsonl", b'{"prompt": "b", "size": "100x64"}\n',
     "line 1: size 100x64: width 100 must be a positive multiple of 16"),
    ("p.jsonl", b'{"prompt": "   "}\n', "line 1: needs a prompt"),
    ("p.yaml", b"prompt: a cat\n", "expected a YAML list of prompts"),
    ("p.yaml", b"- a cat\n- prompt: b\n  prompt: c\n", "entry 2 (line 2): gives 'prompt' twice"),
    ("p.yaml", b"- a cat\n- [a, b\n", "not valid YAML at line 3"),
    ("p.txt", b"\n  \n", "holds no prompts"),
])
def test_a_bad_prompts_file_is_refused_up_front_naming_the_line(tmp_path, cli, name, content, fragment):
    file = tmp_path / name
    file.write_bytes(content)
    code, lines, err = cli.lines("generate", "--prompts", file, "--out-dir", tmp_path / "out", *FAST)
    assert (code, lines) == (2, []) and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    ([], "give --prompt TEXT or --prompts FILE"),
    (["-p", "x", "--prompts", "FILE"], "not both"),
    (["-p", "x", "--shard", "0/2"], "--shard goes with --prompts FILE"),
    (["-p", "x", "--out-dir", "o"], "--out-dir goes with --prompts FILE"),
    (["--prompts", "FILE", "-o", "x.png"], "--out names one file but --prompts makes one per prompt"),
    (["--prompts", "FILE", "--skip-existing", "--overwrite"], "not both"),
    (["--prompts", "FILE", "--ray-workers", "2"], "--ray-workers goes with --ray ADDRESS"),
    (["--prompts", "missing.txt"], "--prompts missing.txt: no such file"),
    (["--prompts", "."], "--prompts . is a folder; give a text, .jsonl or .yaml file"),
    (["--prompts", "/dev/zero"], "--prompts /dev/zero is a character device, not a file"),
    (["--prompts", "huge.txt"], f"--prompts huge.txt is over {64 * 1024 * 1024} bytes; split it"),
])
def test_prompts_usage_errors(tmp_path, cli, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    Path("FILE").write_text("a cat\n")
    with open("huge.txt", "wb") as f:
        f.truncate(64 * 1024 * 1024 + 1)  # sparse: refused by its size, unread
    code, _, err = cli.lines("generate", *args)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_previews_of_a_prompts_batch_go_to_a_folder(tmp_path, cli, one_thread):
    file = tmp_path / "prompts.txt"
    file.write_text("a red circle\na blue square\n")
    out, live = tmp_path / "out", tmp_path / "live"
    out.mkdir()
    live.mkdir()
    code, lines, err = cli.lines("generate", "--prompts", file, "--out-dir", out, "--preview", live, "--seed", 3,
                                 *FAST)
    assert code == 0, err
    assert sorted(p.name for p in live.iterdir()) == sorted(p.name for p in out.iterdir()) == \
        ["0001-a-red-circle.png", "0002-a-blue-square.png"]
    assert all(r["previews"] >= 1 for r in lines)
    for name in ("0001-a-red-circle.png", "0002-a-blue-square.png"):
        assert np.array_equal(np.asarray(Image.open(live / name).convert("RGB")),
                              np.asarray(Image.open(out / name).convert("RGB")))
    code, _, err = cli.lines("generate", "--prompts", file, "--out-dir", out, "--preview", out, "--overwrite",
                             *FAST)
    assert code == 2 and "is the --out-dir" in err and len(err.strip().splitlines()) == 1
