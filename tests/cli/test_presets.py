"""--preset: precedence (flags > preset > defaults), strict checking, hostile YAML, `qimg presets`."""

import json

import pytest
from helpers import one_line
from PIL import Image


@pytest.fixture
def preset(tmp_path):
    def write(text: str, name: str = "p.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def generate(cli, tiny_model_dir, tmp_path, *args):
    out = tmp_path / "o.png"
    code, stdout, err = cli("generate", "-p", "a red circle", "-m", tiny_model_dir, "--size", "32x32",
                            "--device", "cpu", "--json", "-o", out, "--overwrite", *args)
    assert code == 0, err
    return json.loads(stdout), out


def test_preset_values_apply_and_explicit_flags_win(tiny_model_dir, tmp_path, cli, preset, one_thread):
    p = preset("steps: 2\ncfg: 1.5\nseed: 11\nnegative-prompt: blurry\n")
    report, out = generate(cli, tiny_model_dir, tmp_path, "--preset", p)
    assert (report["steps"], report["cfg"], report["seed"], report["negative_prompt"]) == (2, 1.5, 11, "blurry")
    assert json.loads(Image.open(out).info["qimg"])["preset"]["name"] == p.name  # a file by name, not its folder

    report, _ = generate(cli, tiny_model_dir, tmp_path, "--preset", p, "--steps", "1", "--seed", "3")
    assert (report["steps"], report["cfg"], report["seed"]) == (1, 1.5, 3)


def test_bundled_preset_by_name(tiny_model_dir, tmp_path, cli, monkeypatch, one_thread):
    from qimg.cli import presets

    monkeypatch.setattr(presets, "bundled_folder", lambda: tmp_path / "bundled")
    (tmp_path / "bundled").mkdir()
    (tmp_path / "bundled" / "tiny-preview.yaml").write_text("steps: 1\ncfg: 1\n")
    report, _ = generate(cli, tiny_model_dir, tmp_path, "--preset", "tiny-preview")
    assert (report["steps"], report["cfg"], report["preset"]) == (1, 1.0, "tiny-preview")


@pytest.mark.parametrize("text, fragments", [
    ("stepz: 3\n", ["unknown key 'stepz'", "allowed:", "steps", "cfg", "negative_prompt"]),
    ("steps: ten\n", ["steps must be a whole number", "'ten'"]),
    ("steps: 5000\n", ["steps:", "1000"]),
    ("steps: 2.5\n", ["steps must be a whole number"]),
    ("cfg: [1, 2]\n", ["cfg must be a number", "a list"]),
    ("prompt: 12\n", ["prompt must be text"]),
    ("json: maybe\n", ["json must be true or false"]),
    ("out: x.png\n", ["unknown key 'out'"]),
    ("overwrite: true\n", ["unknown key 'overwrite'"]),  # only the command line may let a run replace files
    ("preset: other\n", ["unknown key 'preset'"]),
    ("shard: 0/2\n", ["unknown key 'shard'"]),  # which part of a batch, and where it runs, are each run's own
    ("ray: auto\n", ["unknown key 'ray'"]),
    ("prompts: p.txt\n", ["unknown key 'prompts'"]),
    ("steps: 2\nsteps-: 3\n", ["unknown key 'steps-'"]),
    ("negative-prompt: a\nnegative_prompt: b\n", ["given twice"]),
    ("steps: 2\ncfg: 1\nsteps: 3\n", ["not valid YAML", "line 3", "key 'steps' is given twice"]),
    ("base: &b {steps: 2, steps: 3}\n", ["line 1", "key 'steps' is given twice (in base)"]),
    ("- steps: 2\n", ["is a list", "expected a mapping"]),
    ("just text\n", ["is a str", "expected a mapping"]),
    ("", ["is empty"]),
    ("steps: [unclosed\n", ["not valid YAML", "line"]),
    ("!!python/object/apply:os.system ['touch PWNED']\n", ["not valid YAML", "python/object/apply"]),
    ("steps: !!python/name:os.system\n", ["not valid YAML"]),
    ("1: 2\n", ["unknown key '1'"]),
    ("seed: 2020-01-01\n", ["seed must be a whole number", "a date"]),
    ("steps: !!binary aGVsbG8=\n", ["steps must be a whole number", "a bytes"]),
    ("cfg: !!set {a, b}\n", ["cfg must be a number", "a set"]),
    ("cfg: .nan\n", ["cfg:", "nan"]),
    ("steps: 99999999999999999999999\n", ["steps:", "1000"]),
    ("steps: " + "9" * 5000 + "\n", ["holds a value that cannot be read", "4300 digits"]),
    ("seed: 0x" + "f" * 5000 + "\n", ["seed is a number too large for any option"]),
    ("[a, b]: 1\n", ["not valid YAML", "unhashable key"]),
    ("base: &b {steps: 2}\n<<: *b\n", ["unknown key 'base'"]),
    ("steps: *nowhere\n", ["not valid YAML", "undefined alias"]),
    ("# " + "x" * 300_000 + "\n", ["over 262144 bytes"]),
])
def test_bad_preset_is_one_line_naming_key_and_file(tmp_path, cli, preset, text, fragments):
    p = preset(text)
    code, _, err = cli("generate", "-p", "x", "-m", tmp_path, "-o", tmp_path / "o.png", "--preset", p)
    assert code == 2
    line = one_line(err)
    for fragment in [str(p), *fragments]:
        assert fragment in line, line
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("raw", [b"steps: caf\xe9\n", b"steps: 2\x00\n", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
                                 b"steps: 1\n\xc3\x28\n"])
def test_preset_that_is_not_utf8_text(tmp_path, cli, raw):
    (tmp_path / "p.yaml").write_bytes(raw)
    code, _, err = cli("generate", "-p", "x", "-m", tmp_path, "--preset", tmp_path / "p.yaml")
    assert code == 2 and "not valid YAML" in one_line(err)


def test_preset_from_an_endless_device_is_refused_unread(tmp_path, cli):
    code, _, err = cli("generate", "-p", "x", "-m", tmp_path, "--preset", "/dev/zero")
    assert code == 2 and "preset /dev/zero is a character device, not a file" in one_line(err)


def test_bare_off_gets_a_hint_about_yaml_booleans(tmp_path, cli, preset):
    p = preset("attn-mask: off\n")
    code, _, err = cli("inpaint", tmp_path / "i.png", "-p", "x", "-m", tmp_path, "--preset", p)
    assert code == 2 and "attn-mask must be text" in err and "quote it" in err


@pytest.mark.slow
def test_anchor_bomb_and_deep_nesting_fail_fast_and_cleanly(tmp_path, cli, preset):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    for text in (bomb + "steps: *i\n", bomb, "steps: " + "[" * 5000 + "]" * 5000 + "\n"):
        p = preset(text)
        code, _, err = cli("generate", "-p", "x", "-m", tmp_path, "--preset", p)
        assert code == 2
        line = one_line(err)
        assert str(p) in line and len(line) < 600, line


def test_preset_for_another_command_is_refused(tmp_path, cli):
    code, _, err = cli("inpaint", tmp_path / "i.png", "-p", "x", "-m", tmp_path, "--preset", "wide-outpaint")
    assert code == 2 and "unknown key 'left'" in one_line(err)


@pytest.mark.parametrize("name, fragment", [("no-such-preset", "bundled: fast"), ("missing.yaml", "no such file"),
                                            ("/", "preset / is a folder")])
def test_missing_preset(tmp_path, cli, name, fragment):
    code, _, err = cli("generate", "-p", "x", "-m", tmp_path, "--preset", name)
    assert code == 2 and fragment in one_line(err)


def test_presets_lists_the_bundled_ones_with_their_contents(cli):
    code, out, err = cli("presets")
    assert code == 0, err
    for name, fits, line in [("fast", "generate, inpaint, outpaint, edit, chain", "reuse: 0.1"),
                             ("quality", "(generate, inpaint, outpaint, edit)", "steps: 60"),
                             ("wide-outpaint", "(outpaint)", "left: 256"),
                             ("product-recolour", "(inpaint)", "strength: 0.8")]:
        assert name in out and fits in out and line in out, out


def test_every_bundled_preset_checks_against_the_commands_it_lists(cli):
    """`qimg presets` says which commands a preset fits; each of those must accept it."""
    import typer

    from qimg.cli import presets
    from qimg.cli.app import app

    group = typer.main.get_command(app)
    arguments = {"generate": ["-p", "x"], "inpaint": ["i.png", "-p", "x"], "outpaint": ["i.png", "-p", "x"],
                 "edit": ["i.png", "-p", "x"],
                 "chain": ["i.png", "c.yaml"]}
    for name, path in presets.bundled().items():
        options = presets.read_yaml(path, "preset")
        fits = presets.fitting_commands(group, options)
        assert fits, name
        for command in fits:
            ctx = group.commands[command].make_context(command, [*arguments[command], "--preset", name])
            assert ctx.params["preset"] == name
            assert all(ctx.get_parameter_source(key.replace("-", "_")).name == "DEFAULT_MAP" for key in options)
