"""Output metadata: every PNG carries the parameters that made it, and `qimg info` reads them back as data."""

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from qimg.cache import array_hash
from qimg.masks import rect_mask
from qimg.weights.fingerprint import fingerprint


@pytest.mark.slow
def test_generate_and_inpaint_parameters_round_trip(tiny_model_dir, tmp_path, cli):
    prompt = "一只猫 on a table, \x1b[31m red"
    gen, edit = tmp_path / "g.png", tmp_path / "e.png"
    code, out, err = cli("generate", "-m", tiny_model_dir, "-p", prompt, "--size", "64x48", "--steps", "2",
                         "--cfg", "2.5", "--seed", "11", "--device", "cpu", "-o", gen, "--json")
    assert code == 0, err
    code, out, err = cli("info", gen, "--json")
    assert code == 0, err
    params = json.loads(out)
    expected = dict(command="generate", prompt=prompt, negative_prompt=" ", seed=11, steps=2, cfg=2.5, width=64,
                    height=48, model=tiny_model_dir.name, model_fingerprint=fingerprint(tiny_model_dir), preset=None,
                    lineage=[])
    assert {k: params[k] for k in expected} == expected

    code, out, err = cli("inpaint", gen, "-m", tiny_model_dir, "-p", "x", "--rect", "8,8,16,8", "--steps", "2",
                         "--seed", "3", "--device", "cpu", "-o", edit)
    assert code == 0, err
    params = json.loads(cli("info", edit, "--json")[1])
    assert params["command"] == "inpaint" and params["input"]["name"] == gen.name and params["seed"] == 3
    assert params["mask_sha256"] == array_hash(rect_mask([(8, 8, 24, 16)], 64, 48))

    code, out, err = cli("info", gen)
    assert code == 0 and "\x1b" not in out and "\\u001b[31m" in out and "一只猫" in out
    assert any(line.split() == ["seed", "11"] for line in out.splitlines())


def test_png_without_parameters_is_one_clear_line(tmp_path, cli):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    code, out, err = cli("info", tmp_path / "plain.png")
    assert code == 1 and out == "" and err.strip() == (
        f"qimg: error: {tmp_path / 'plain.png'} carries no qimg parameters (only PNG outputs of qimg do, and "
        "other programs may drop them when they re-save a file)")


def test_damaged_parameters_are_reported_not_evaluated(tmp_path, cli):
    for name, text in [("code.png", "__import__('os').system('touch PWNED')"), ("list.png", "[1, 2]")]:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("qimg", text)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name, pnginfo=info)
        code, out, err = cli("info", tmp_path / name)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "qimg parameters are not" in err
    assert not (tmp_path / "PWNED").exists()


def test_info_on_a_missing_file(tmp_path, cli):
    code, _, err = cli("info", tmp_path / "nope.png")
    assert code == 2 and "no such file" in err


def test_hostile_parameters_are_one_line_or_printed_as_escapes(tmp_path, cli):
    """Found by fuzzing: deep nesting used to end in a RecursionError, a lone surrogate (valid as a JSON escape,
    not as UTF-8) in a failed print."""
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for name, text in [("deep.png", deep), ("lone.png", '{"prompt": "\\ud800"}')]:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("qimg", text)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name, pnginfo=info)
    code, out, err = cli("info", tmp_path / "deep.png")
    assert code == 1 and err.strip() == f"qimg: error: {tmp_path / 'deep.png'}: its qimg parameters are nested too " \
                                        "deeply to be qimg's"
    code, out, err = cli("info", tmp_path / "lone.png")
    assert code == 0 and out.split() == ["prompt", '"\\ud800"'], (out, err)
    code, out, err = cli("info", tmp_path / "lone.png", "--json")
    assert code == 0 and json.loads(out) == {"prompt": "\ud800"}, (out, err)


def test_non_finite_numbers_are_refused_so_info_json_stays_strict_json(tmp_path, cli):
    """json.loads takes NaN, Infinity and 1e400 (as inf), which qimg never writes and `--json` would print as
    NaN/Infinity, which strict JSON parsers reject."""
    for value in ["NaN", "Infinity", "-Infinity", "1e400"]:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("qimg", f'{{"cfg": {value}, "seed": 1}}')
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "n.png", pnginfo=info)
        for args in ([], ["--json"]):
            code, out, err = cli("info", tmp_path / "n.png", *args)
            assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, (out, err)
            assert "not valid JSON" in err and value in err, err

