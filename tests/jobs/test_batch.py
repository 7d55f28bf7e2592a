"""Batches of edits: inputs from files, folders and globs, masks by stem, per-file seeds, a bad file skipped
and named in the summary, --skip-existing resuming, the model loaded once."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import corrupt_files, leftovers, signal_self
from PIL import Image
from skimage import data

from qimg.jobs.batch import expand_inputs, file_seed, mask_for

COMMON = ["--steps", "2", "--device", "cpu", "--json"]


@pytest.fixture
def folder(tmp_path):
    """Three photos (one a JPEG), a broken 'PNG', and a mask per photo under masks/."""
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    img = data.astronaut()
    for i, name in enumerate(["a.png", "b.jpg", "c.png"]):
        Image.fromarray(img[i * 50 : i * 50 + 64, :96]).save(photos / name)
        m = np.zeros((64, 96), np.uint8)
        m[10 + i : 30 + i, 20:50] = 255
        stem = Path(name).stem
        Image.fromarray(m).save(masks / (f"{stem}_mask.png" if name == "c.png" else f"{stem}.png"))
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    Image.new("L", (96, 64), 255).save(masks / "broken.png")
    return photos, masks


def test_folder_listing_skips_outputs_masks_and_other_files(tmp_path):
    for name in ["a.png", "a.inpaint.png", "a.outpaint-2.png", "a.edit.png", "a.edit-3.png", "a_mask.png", "b.JPG",
                 "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    files, batch = expand_inputs([tmp_path])
    assert [f.name for f in files] == ["a.png", "b.JPG"] and batch
    assert expand_inputs([tmp_path / "a.png"]) == ([tmp_path / "a.png"], False)
    files, batch = expand_inputs([tmp_path / "a.png", tmp_path / "a.png", Path(str(tmp_path / "*.JPG"))])
    assert [f.name for f in files] == ["a.png", "b.JPG"] and batch


def test_masks_are_found_by_stem(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "y_mask.png").write_bytes(b"")
    assert mask_for(tmp_path, Path("in/x.jpg")) == tmp_path / "x.png"
    assert mask_for(tmp_path, Path("y.png")) == tmp_path / "y_mask.png"
    with pytest.raises(Exception, match="no mask for z.png"):
        mask_for(tmp_path, Path("z.png"))


def test_file_seeds_differ_by_name_and_not_by_folder():
    assert file_seed(7, Path("a/x.png")) == file_seed(7, Path("b/x.png"))
    assert len({file_seed(7, Path("x.png")), file_seed(7, Path("y.png")), file_seed(8, Path("x.png"))}) == 3


@pytest.mark.slow
def test_batch_with_a_broken_file_finishes_the_rest_and_fails_at_the_end(tiny_model_dir, folder, tmp_path, cli,
                                                                        monkeypatch):
    from qimg.engine import components

    loads = []
    real = components.load_transformer
    monkeypatch.setattr(components, "load_transformer", lambda cfg, path, *a, **k: loads.append(path.name) or
                        real(cfg, path, *a, **k))
    photos, masks = folder
    out = tmp_path / "out"
    args = ["inpaint", photos, "-m", tiny_model_dir, "-p", "x", "--mask-dir", masks, "--out-dir", out,
            "--seed", "7", *COMMON]
    code, lines, err = cli.lines(*args)
    assert code == 1
    done = {Path(r["input"]).name: r for r in lines if "output" in r}
    assert sorted(done) == ["a.png", "b.jpg", "c.png"]
    assert [Path(r["input"]).name for r in lines if "error" in r] == ["broken.png"]
    assert err.strip().splitlines()[-1] == f"qimg: error: 1 of 4 images failed: {photos / 'broken.png'}"
    assert "Traceback" not in err
    for name, r in done.items():
        assert r["seed"] == file_seed(7, Path(name)) and Path(r["output"]) == out / f"{Path(name).stem}.inpaint.png"
        before, after = np.asarray(Image.open(photos / name).convert("RGB")), np.asarray(Image.open(r["output"]))
        keep = np.asarray(Image.open(mask_for(masks, Path(name)))) == 0
        assert np.array_equal(after[keep], before[keep])
    assert sorted(p.name for p in out.iterdir()) == ["a.inpaint.png", "b.inpaint.png", "c.inpaint.png"]
    assert loads.count("transformer") == 1  # one model for the whole batch

    # Resume: everything made is skipped untouched; the broken file still fails.
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    code, lines, err = cli.lines(*args, "--skip-existing")
    assert code == 1 and sum(bool(r.get("skipped")) for r in lines) == 3
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_skip_existing_on_a_single_file(tiny_model_dir, folder, cli):
    photos, masks = folder
    (photos / "a.inpaint.png").write_bytes(b"made earlier")
    code, lines, err = cli.lines("inpaint", photos / "a.png", "-m", tiny_model_dir, "-p", "x", "--rect",
                                 "0,0,9,9", "--skip-existing", *COMMON)
    assert code == 0 and lines == [{"input": str(photos / "a.png"), "output": str(photos / "a.inpaint.png"),
                                    "skipped": True}]
    assert (photos / "a.inpaint.png").read_bytes() == b"made earlier"


@pytest.mark.slow
def test_missing_mask_in_a_batch_is_that_file_s_error(tiny_model_dir, folder, cli):
    photos, masks = folder
    (masks / "b.png").unlink()
    code, lines, err = cli.lines("inpaint", photos / "a.png", photos / "b.jpg", "-m", tiny_model_dir, "-p", "x",
                                 "--mask-dir", masks, *COMMON)
    assert code == 1 and [r["input"] for r in lines if "output" in r] == [str(photos / "a.png")]
    assert "no mask for b.jpg" in err and err.strip().splitlines()[-1].endswith("1 of 2 images failed: " +
                                                                             str(photos / "b.jpg"))


@pytest.mark.slow
def test_outpaint_batch_from_a_glob(tiny_model_dir, folder, tmp_path, cli):
    photos, _ = folder
    code, lines, err = cli.lines("outpaint", str(photos / "[ac].png"), "-m", tiny_model_dir, "-p", "x",
                                 "--right", "16", "--out-dir", tmp_path / "o", *COMMON)
    assert code == 0, err
    assert [(Path(r["input"]).name, r["width"]) for r in lines] == [("a.png", 112), ("c.png", 112)]


@pytest.mark.parametrize("args, fragment", [
    (["PHOTOS/a.png", "PHOTOS/c.png", "-o", "x.png"], "--out-dir"),
    (["PHOTOS/*.gif"], "no files match"),
    (["PHOTOS/a.png", "PHOTOS/a.jpg"], "would both write"),
    (["PHOTOS/a.png", "--mask", "m.png", "--mask-dir", "MASKS"], "not both"),
])
def test_batch_usage_errors(configs_only, folder, tmp_path, cli, args, fragment):
    photos, masks = folder
    Image.new("RGB", (8, 8)).save(photos / "a.jpg")
    args = [a.replace("PHOTOS", str(photos)).replace("MASKS", str(masks)) for a in args]
    code, _, err = cli.lines("inpaint", *args, "-p", "x", "--rect", "0,0,9,9", "-m", configs_only)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.slow
def test_preset_applies_to_every_file_of_a_batch(tiny_model_dir, folder, tmp_path, cli):
    photos, _ = folder
    preset = tmp_path / "wide.yaml"
    preset.write_text("right: 16\nstrength: 0.9\nsteps: 1\n")  # COMMON's --steps 2 wins
    code, lines, err = cli.lines("outpaint", str(photos / "[ac].png"), "-m", tiny_model_dir, "-p", "x",
                                 "--preset", preset, "--out-dir", tmp_path / "o", *COMMON)
    assert code == 0, err
    assert [(r["width"], r["strength"], r["steps"], r["preset"]) for r in lines] == [(112, 0.9, 2, str(preset))] * 2
    for r in lines:
        assert json.loads(Image.open(r["output"]).info["qimg"])["preset"]["name"] == "wide.yaml"  # not its folder


# --- existing outputs, the never-clobber policy and --overwrite in batches ---------------------------------


@pytest.mark.slow
def test_existing_outputs_refuse_the_batch_up_front_unless_told(tiny_model_dir, configs_only, folder, tmp_path,
                                                                 cli, one_thread):
    photos, _ = folder
    out = tmp_path / "out"
    args = ["inpaint", str(photos / "[ac].png"), "-p", "x", "--rect", "0,0,9,9", "--out-dir", out, "--seed", "1",
            "--steps", "1", "--device", "cpu", "--json"]
    code, lines, err = cli.lines(*args, "-m", tiny_model_dir)
    assert code == 0, err
    made = {p.name: np.asarray(Image.open(p)) for p in out.iterdir()}
    (out / "a.inpaint.png").write_bytes(b"edited by hand")  # the user touched up one result

    # Neither flag: refused before any model loads (configs_only would fail at the loader, exit 1).
    code, lines, err = cli.lines(*args, "-m", configs_only)
    assert code == 2 and lines == [] and len(err.strip().splitlines()) == 1, err
    for fragment in ["2 of 2 outputs exist already", str(out / "a.inpaint.png"), "--skip-existing", "--overwrite"]:
        assert fragment in err, err
    code, _, err = cli.lines(*args, "-m", configs_only, "--skip-existing", "--overwrite")
    assert code == 2 and "not both" in err
    assert (out / "a.inpaint.png").read_bytes() == b"edited by hand"

    # --overwrite: the same names, replaced; nothing numbered.
    code, lines, err = cli.lines(*args, "-m", tiny_model_dir, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.inpaint.png", "c.inpaint.png"]
    for name, pixels in made.items():  # same seed, same images: the hand edit is gone
        assert np.array_equal(np.asarray(Image.open(out / name)), pixels)


def test_an_output_that_would_replace_another_input_is_refused(configs_only, folder, tmp_path, cli):
    photos, _ = folder
    Image.new("RGB", (8, 8)).save(photos / "a.inpaint.png")
    code, _, err = cli.lines("inpaint", photos / "a.png", photos / "a.inpaint.png", "-p", "x", "--rect", "0,0,9,9",
                             "-m", configs_only, "--overwrite")
    assert code == 2 and "is an input and the output of" in err and "--out-dir" in err, err


@pytest.mark.slow
def test_outputs_that_appear_while_the_batch_runs_are_kept_and_only_their_files_fail(tiny_model_dir, folder, tmp_path,
                                                                                      cli, monkeypatch, one_thread):
    from qimg.engine.engine import Engine

    photos, masks = folder
    out = tmp_path / "out"
    real, calls = Engine.inpaint, []

    def inpaint(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # another program writes a.png's output and c.png's while a.png is being edited
            (out / "a.inpaint.png").write_bytes(b"theirs")
            (out / "c.inpaint.png").write_bytes(b"theirs too")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "inpaint", inpaint)
    out.mkdir()
    code, lines, err = cli.lines("inpaint", photos / "a.png", photos / "b.jpg", photos / "c.png", "-p", "x",
                                 "--mask-dir", masks, "--out-dir", out, "-m", tiny_model_dir, *COMMON)
    assert code == 1 and "Traceback" not in err
    assert [Path(r["input"]).name for r in lines if "output" in r] == ["b.jpg"]
    errors = {Path(r["input"]).name: r["error"] for r in lines if "error" in r}
    assert "appeared while qimg was working; it was kept" in errors["a.png"]
    assert "exists; pass --overwrite" in errors["c.png"]
    assert err.strip().splitlines()[-1].startswith("qimg: error: 2 of 3 images failed")
    assert (out / "a.inpaint.png").read_bytes() == b"theirs" and (out / "c.inpaint.png").read_bytes() == b"theirs too"
    assert sorted(p.name for p in out.iterdir()) == ["a.inpaint.png", "b.inpaint.png", "c.inpaint.png"]


@pytest.mark.slow
def test_batch_continues_past_every_kind_of_bad_file(tiny_model_dir, tmp_path, cli, one_thread):
    photos = tmp_path / "in"
    photos.mkdir()
    bad = {path: message for case, (path, message) in corrupt_files(photos, data.astronaut()[::8, ::8].copy()).items()
           if case not in ("missing", "folder")}
    code, lines, err = cli.lines("inpaint", photos, "-p", "x", "--rect", "0,0,9,9", "-m", tiny_model_dir,
                                 "--out-dir", tmp_path / "out", *COMMON)
    assert code == 1 and "Traceback" not in err
    assert [Path(r["output"]).name for r in lines if "output" in r] == ["good.inpaint.png"]
    errors = {Path(r["input"]): r["error"] for r in lines if "error" in r}
    assert errors.keys() == bad.keys()
    for path, message in bad.items():
        assert message in errors[path], (path, errors[path])
    assert err.strip().splitlines()[-1].startswith(f"qimg: error: {len(bad)} of {len(bad) + 1} images failed")


@pytest.mark.slow
def test_interrupted_batch_names_what_it_finished(tiny_model_dir, folder, tmp_path, cli, monkeypatch, one_thread):
    import signal

    from qimg.engine.engine import Engine

    photos, masks = folder
    out = tmp_path / "out"
    real, calls = Engine.inpaint, []

    def inpaint(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal_self(signal.SIGINT)()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "inpaint", inpaint)
    code, lines, err = cli.lines("inpaint", photos / "a.png", photos / "c.png", "-p", "x", "--mask-dir", masks,
                                 "--out-dir", out, "-m", tiny_model_dir, *COMMON)
    assert code == 130 and err.strip().splitlines()[-1] == f"qimg: interrupted after writing {out / 'a.inpaint.png'}"
    assert sorted(p.name for p in out.iterdir()) == ["a.inpaint.png"] and leftovers(out) == []


def test_an_output_never_replaces_a_mask_the_batch_reads_even_with_overwrite(configs_only, tmp_path, cli):
    """--mask-dir and --out-dir one folder, and an input named like another's output: x.png's output would be
    the mask of x.inpaint.png, which the batch reads later. Refused up front, --overwrite or not."""
    (tmp_path / "in").mkdir(), (tmp_path / "other").mkdir(), (tmp_path / "shared").mkdir()
    for name in ["in/x.png", "other/x.inpaint.png"]:
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    for name in ["x.png", "x.inpaint.png"]:
        Image.new("L", (32, 32), 255).save(tmp_path / "shared" / name)
    before = {p: p.read_bytes() for p in (tmp_path / "shared").iterdir()}
    shared = tmp_path / "shared"
    for flags in ([], ["--overwrite"], ["--skip-existing"]):
        code, lines, err = cli.lines("inpaint", tmp_path / "in" / "x.png", tmp_path / "other" / "x.inpaint.png",
                                     "-p", "x", "--mask-dir", shared, "--out-dir", shared, "-m", configs_only, *flags)
        assert code == 2 and lines == [] and len(err.strip().splitlines()) == 1, err
        for fragment in [str(shared / "x.inpaint.png"), f"the mask of {tmp_path / 'other' / 'x.inpaint.png'}",
                         "never replaces"]:
            assert fragment in err, err
    assert {p: p.read_bytes() for p in shared.iterdir()} == before


def test_out_dir_that_is_a_file_is_a_usage_error(configs_only, folder, tmp_path, cli):
    photos, _ = folder
    (tmp_path / "taken").write_text("notes")
    code, lines, err = cli.lines("inpaint", photos / "a.png", photos / "c.png", "-p", "x", "--rect", "0,0,9,9",
                                 "--out-dir", tmp_path / "taken", "-m", configs_only)
    assert code == 2 and lines == [] and err.strip() == f"qimg: error: --out-dir {tmp_path / 'taken'} is a file, " \
                                                        "not a folder; choose another folder", err
    assert (tmp_path / "taken").read_text() == "notes"
