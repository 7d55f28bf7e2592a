"""A shared picture names no local folder (issue 27, item 6): the PNG text chunks of generate, inpaint (a mask
file), edit (a --ref picture), chain (and its --keep-steps files and previews) hold files by name and sha256 and
the model by its folder name and fingerprint, while --json keeps the paths; --metadata minimal keeps only what
reproduces the image, off writes no parameters (previews keep their mark); `qimg info` reads them all."""

import hashlib
import json

import numpy as np
import pytest
from helpers import one_line
from PIL import Image

from qimg.jobs.metadata import MINIMAL

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
FAST = ["--steps", "1", "--seed", "3", "--device", "cpu", "--cfg", "1", "--no-worker", "--json"]
PHOTO = np.s_[:384:8, ::8]  # the astronaut at 64x48


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chunks(path) -> dict:
    """Every text chunk of a PNG."""
    with Image.open(path) as image:
        return {k: v for k, v in image.info.items() if isinstance(v, str)}


def stored(path, *folders) -> dict:
    """The qimg parameters of `path`, after checking that no text chunk names any of `folders`."""
    text = chunks(path)
    for folder in folders:
        assert all(str(folder) not in value for value in text.values()), (folder, text)
    return json.loads(text["qimg"])


def test_generate_names_the_model_and_a_preset_file_by_name(tiny_model_dir, tmp_path, cli):
    (tmp_path / "mine.yaml").write_text("steps: 1\n")
    out = tmp_path / "o.png"
    code, [report], err = cli.lines("generate", "-p", "x", "--size", "32x32", "-m", tiny_model_dir, "-o", out,
                               "--preset", tmp_path / "mine.yaml", *FAST)
    assert code == 0, err
    params = stored(out, tmp_path, tiny_model_dir)
    assert params["model"] == tiny_model_dir.name and params["model_fingerprint"] == report["model_fingerprint"]
    assert params["preset"] == {"name": "mine.yaml", "sha256": sha256(tmp_path / "mine.yaml")}
    # --json is local output: the paths as given
    assert report["model"] == str(tiny_model_dir) and report["preset"] == str(tmp_path / "mine.yaml")
    code, [info], err = cli.lines("info", out, "--json")
    assert code == 0 and info == json.loads(chunks(out)["qimg"]), err


def test_inpaint_stores_its_input_and_mask_file_by_name_and_sha256(tiny_model_dir, photo, tmp_path, cli):
    mask = tmp_path / "masks" / "m.png"
    mask.parent.mkdir()
    Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), ((8, 24), (8, 40)))).save(mask)
    out, preview = tmp_path / "o.png", tmp_path / "p.png"
    code, [report], err = cli.lines("inpaint", photo, "-p", "x", "--mask", mask, "-m", tiny_model_dir, "-o", out,
                               "--preview", preview, *FAST)
    assert code == 0, err
    for path in (out, preview):
        params = stored(path, tmp_path, tiny_model_dir)
        assert params["input"] == {"name": "astronaut.png", "sha256": sha256(photo)}
        assert params["mask"] == {"name": "m.png", "sha256": sha256(mask)}
    assert report["input"] == str(photo) and report["mask"] == str(mask)


def test_edit_stores_its_ref_pictures_by_name_and_sha256(tiny_plus_dir, photo, tmp_path, cli):
    ref = tmp_path / "refs" / "hat.png"
    ref.parent.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8)).save(ref)
    out = tmp_path / "o.png"
    code, [report], err = cli.lines("edit", photo, "-p", "put the hat of Picture 2 on", "--ref", ref, "-m",
                               tiny_plus_dir, "-o", out, "--edit-area", "3072", "--vision-area", "1024", *FAST)
    assert code == 0, err
    params = stored(out, tmp_path, tiny_plus_dir)
    assert params["refs"] == [{"name": "hat.png", "sha256": sha256(ref)}] and params["model"] == tiny_plus_dir.name
    assert params["input"] == {"name": "astronaut.png", "sha256": sha256(photo)} and params["mask"] is None
    assert report["refs"] == [str(ref)]


def test_chain_outputs_name_no_folder(tiny_model_dir, photo, tmp_path, cli):
    (tmp_path / "chains").mkdir()
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(tmp_path / "chains" / "all.png")
    chain_file = tmp_path / "chains" / "c.yaml"
    chain_file.write_text("edits:\n  - inpaint: {prompt: a cat, mask: all.png}\n  - outpaint: {prompt: x, left: 16}\n")
    out = tmp_path / "o.png"
    code, [report], err = cli.lines("chain", photo, chain_file, "-m", tiny_model_dir, "-o", out, "--keep-steps",
                               tmp_path / "steps", "--preview", tmp_path / "p.png", *FAST)
    assert code == 0, err
    for path in (out, tmp_path / "p.png", *(tmp_path / "steps").iterdir()):
        params = stored(path, tmp_path, tiny_model_dir)
        assert params["chain"] == {"name": "c.yaml", "sha256": sha256(chain_file)}
        assert params["input"] == {"name": "astronaut.png", "sha256": sha256(photo)}
    assert report["chain"] == str(chain_file) and report["input"] == str(photo)
    # minimal: the sampling of each edit, nothing of the files
    code, _, err = cli.lines("chain", photo, chain_file, "-m", tiny_model_dir, "-o", out, "--overwrite",
                        "--metadata", "minimal", *FAST)
    assert code == 0, err
    params = stored(out, tmp_path, tiny_model_dir)
    assert set(params) == {"qimg_version", "command", "seed", "width", "height", "model", "model_fingerprint",
                           "lineage"}
    assert [(e["index"], e["kind"], e["prompt"]) for e in params["lineage"]] == [(1, "inpaint", "a cat"),
                                                                                 (2, "outpaint", "x")]
    assert all("mask_sha256" not in e and "key" not in e for e in params["lineage"])


def test_metadata_minimal_and_off(tiny_model_dir, tmp_path, cli):
    out, preview = tmp_path / "o.png", tmp_path / "p.png"
    args = ["generate", "-p", "x", "--size", "32x32", "-m", tiny_model_dir, "-o", out, "--overwrite", *FAST]
    code, [report], err = cli.lines(*args, "--metadata", "minimal", "--shift", "3")
    assert code == 0, err
    params = stored(out)
    assert set(params) == {"qimg_version", *MINIMAL} - {"strength"} and params["shift"] == 3
    assert {k: params[k] for k in MINIMAL if k in params} == {k: report[k] for k in MINIMAL if k in params} | {
        "model": tiny_model_dir.name}
    code, [info], err = cli.lines("info", out, "--json")
    assert code == 0 and info == params, err
    # off: no parameters in the output nor in the preview, which keeps its mark; --json still reports them
    code, [report], err = cli.lines(*args, "--metadata", "off", "--preview", preview)
    assert code == 0 and report["prompt"] == "x", err
    assert chunks(out) == {} and chunks(preview) == {"qimg-preview": "result"}
    code, _, err = cli.lines("info", out)
    assert code == 1 and "carries no qimg parameters" in err
    # a preset may say it; a bad value is one line
    (tmp_path / "quiet.yaml").write_text("metadata: off\n")
    code, _, err = cli.lines(*args, "--preset", tmp_path / "quiet.yaml")
    assert code == 2 and "(quote it" in err, err  # YAML's bare off is false
    (tmp_path / "quiet.yaml").write_text("metadata: 'off'\n")
    code, _, err = cli.lines(*args, "--preset", tmp_path / "quiet.yaml")
    assert code == 0 and chunks(out) == {}, err
    code, _, err = cli.lines(*args, "--metadata", "secret")
    assert code == 2, err
    one_line(err, "--metadata")
