"""Output names are decided once (jobs/names.py): the --skip-existing check, the batch's up-front checks and the
write all name a batch's output through names.edit_output, and a folder's listing skips what qimg writes."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from qimg.cli.app import run
from qimg.jobs import names
from qimg.jobs.batch import expand_inputs


def test_a_listing_skips_every_edit_output_and_its_numbered_names(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    for kind in names.EDIT_KINDS:
        for numbered in (False, True):  # the second call finds the first name taken: `-2`
            path = names.edit_output(tmp_path / "a.png", kind, None, numbered)
            path.write_bytes(b"")
    assert len(list(tmp_path.iterdir())) == 1 + 2 * len(names.EDIT_KINDS)
    assert expand_inputs([tmp_path]) == ([tmp_path / "a.png"], True)


def test_the_skip_check_the_batch_checks_and_the_write_ask_one_function(tmp_path, monkeypatch, capsys, configs_only):
    """names.edit_output renamed here: a second spelling of `<stem>.<kind>.png` anywhere would check or write
    the old name and fail this."""
    from qimg.jobs.edit import edit_output

    def edit_output_renamed(image: Path, kind: str, out_dir, numbered: bool = False) -> Path:
        return (out_dir or image.parent) / f"renamed-{kind}-{image.stem}.png"

    monkeypatch.setattr(names, "edit_output", edit_output_renamed)
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photos / name)
    out.mkdir()
    (out / "renamed-inpaint-a.png").write_bytes(b"")
    args = ["inpaint", photos, "-p", "x", "--rect", "0,0,8,8", "-m", configs_only, "--out-dir", out, "--json"]

    assert run([str(a) for a in args]) == 2  # the batch's outputs-exist check sees the renamed file
    assert "renamed-inpaint-a.png" in capsys.readouterr().err

    code = run([str(a) for a in [*args, "--skip-existing"]])
    stdout, err = capsys.readouterr()
    skipped = [json.loads(line) for line in stdout.splitlines()]
    assert [Path(r["output"]).name for r in skipped if r.get("skipped")] == ["renamed-inpaint-a.png"], (stdout, err)
    assert code != 0 and "no .safetensors" in err  # b.png went on to load the model (configs only)

    assert edit_output(photos / "b.png", None, out, "inpaint", False, is_batch=True)[0] == out / \
        "renamed-inpaint-b.png"  # the write
    assert edit_output(photos / "b.png", None, None, "inpaint", False)[0] == photos / "renamed-inpaint-b.png"
