"""`qimg chain` on a real photo with the tiny checkpoint: pixels no edit touched stay byte-identical through
every round, a one-edit chain is exactly `qimg inpaint`, the cache recomputes only changed edits, errors
name the edit, lineage is recorded."""

import json

import numpy as np
import pytest
from helpers import leftovers, pixels
from PIL import Image

from qimg.cache import array_hash
from qimg.model.transformer import QwenImageTransformer
from qimg.weights.fingerprint import fingerprint

PHOTO = np.s_[:150, :227]  # the `photo` fixture: odd sizes, so the window pads and shifts


def write_chain(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chain.yaml").write_text(text)
    return folder / "chain.yaml"


def count_forwards(monkeypatch, fail_after=None):
    """A list that grows by one each time the transformer runs (once per sampler step at cfg 1); past
    `fail_after` runs it raises instead, as running out of memory would."""
    calls, forward = [], QwenImageTransformer.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("out of memory")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(QwenImageTransformer, "forward", counted)
    return calls


def chain(cli, tiny_model_dir, photo, chain_file, tmp_path, *args):
    return cli.json("chain", photo, chain_file, "-m", tiny_model_dir, "--device", "cpu", "--json",
                    "--cache-dir", tmp_path / "cache", *args)


@pytest.mark.slow
def test_five_rounds_keep_every_untouched_pixel_byte_identical(tiny_model_dir, photo, tmp_path, cli, one_thread):
    soft = np.zeros((150 + 11, 227 + 21), np.float32)  # the canvas after the first outpaint
    soft[100:140, 150:220] = 1
    soft[95:100, 150:220] = 0.5
    (tmp_path / "chains" / "masks").mkdir(parents=True)
    Image.fromarray((soft * 255).astype(np.uint8)).save(tmp_path / "chains" / "masks" / "sign.png")
    chain_file = write_chain(tmp_path / "chains", """
seed: 7
steps: 2
cfg: 1
edits:
  - inpaint: {rect: "20,30,40,25", prompt: "a red lantern"}
  - outpaint: {left: 21, top: 11, feather: 6, prompt: "a night street"}
  - inpaint: {mask: masks/sign.png, prompt: "a neon sign", grow: 1}
  - outpaint: {right: 13, bottom: 9, feather: 4, prompt: "more street", seed: 3}
  - inpaint: {rect: "0,0,30,30", prompt: "the moon"}
""")
    out = tmp_path / "final.png"
    code, report, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", out)
    assert code == 0, err
    before, after = pixels(photo), pixels(out)
    assert after.shape == (150 + 11 + 9, 227 + 21 + 13, 3) and (report["width"], report["height"]) == (261, 170)
    assert [e["kind"] for e in report["lineage"]] == ["inpaint", "outpaint", "inpaint", "outpaint", "inpaint"]
    assert [e["seed"] for e in report["lineage"]] == [7, 7, 7, 3, 7]

    # Every mask, drawn here on the final canvas: edits 3 to 5 see its coordinates, edit 1 sits at (21, 11).
    touched = np.zeros(after.shape[:2], bool)
    touched[11 + 30 : 11 + 55, 21 + 20 : 21 + 60] = True  # edit 1
    touched[: 11 + 6] = touched[:, : 21 + 6] = True  # edit 2: the new area and its 6 px band
    touched[95 - 1 : 140 + 1, 150 - 1 : 220 + 1] = True  # edit 3: the mask file, grown by 1
    touched[161 - 4 :] = touched[:, 248 - 4 :] = True  # edit 4
    touched[:30, :30] = True  # edit 5
    kept = ~touched[11 : 11 + 150, 21 : 21 + 227]
    assert kept.mean() > 0.6
    assert np.array_equal(after[11 : 11 + 150, 21 : 21 + 227][kept], before[kept])
    assert (after[11 + 30 : 11 + 55, 21 + 20 : 21 + 60] != before[30:55, 20:60]).mean() > 0.5


@pytest.mark.slow
def test_one_edit_chain_is_exactly_qimg_inpaint(tiny_model_dir, photo, tmp_path, cli, one_thread):
    chain_file = write_chain(tmp_path, 'edits:\n  - inpaint: {rect: "50,40,60,30", feather: 5, prompt: "a cat"}\n')
    common = ["--steps", "2", "--seed", "5", "--device", "cpu", "-m", tiny_model_dir]
    code, _, err = cli.json("chain", photo, chain_file, "-o", tmp_path / "c.png", "--no-cache", *common)
    assert code == 0, err
    code, _, err = cli.json("inpaint", photo, "-p", "a cat", "--rect", "50,40,60,30", "--feather", "5",
                            "-o", tmp_path / "i.png", *common)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "c.png"), pixels(tmp_path / "i.png"))


@pytest.mark.slow
def test_changing_the_last_edit_recomputes_only_that_edit(tiny_model_dir, photo, tmp_path, cli, monkeypatch,
                                                           one_thread):
    forward_calls = count_forwards(monkeypatch)
    text = """
seed: 1
cfg: 1
edits:
  - inpaint: {rect: "10,10,40,40", prompt: "a red lantern", steps: 2}
  - outpaint: {right: 24, prompt: "a street", steps: 3}
  - inpaint: {rect: "100,60,50,40", prompt: "LAST", steps: 4}
"""
    chain_file = write_chain(tmp_path / "c", text.replace("LAST", "a neon sign"))
    code, first, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", tmp_path / "1.png")
    assert code == 0, err
    assert [e["cache"] for e in first["lineage"]] == ["miss"] * 3 and len(forward_calls) == 2 + 3 + 4

    forward_calls.clear()
    code, again, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", tmp_path / "2.png")
    assert code == 0, err
    assert [e["cache"] for e in again["lineage"]] == ["hit"] * 3 and forward_calls == []
    assert np.array_equal(pixels(tmp_path / "1.png"), pixels(tmp_path / "2.png"))

    write_chain(tmp_path / "c", text.replace("LAST", "a vending machine"))
    code, changed, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", tmp_path / "3.png")
    assert code == 0, err
    assert [e["cache"] for e in changed["lineage"]] == ["hit", "hit", "miss"] and len(forward_calls) == 4

    # The cached steps give what running them again gives.
    code, _, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", tmp_path / "4.png", "--no-cache")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "3.png"), pixels(tmp_path / "4.png"))


@pytest.mark.slow
def test_a_failing_edit_keeps_the_edits_before_it(tiny_model_dir, photo, tmp_path, cli, monkeypatch, one_thread):
    chain_file = write_chain(tmp_path / "c", """
seed: 2
cfg: 1
steps: 2
edits:
  - inpaint: {rect: "10,10,40,40", prompt: "one"}
  - inpaint: {rect: "60,60,40,40", prompt: "two"}
""")
    forward = QwenImageTransformer.forward
    count_forwards(monkeypatch, fail_after=2)  # edit 1 runs its 2 steps, edit 2 fails
    out, steps = tmp_path / "o.png", tmp_path / "steps"
    code, _, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", out, "--keep-steps", steps)
    assert code == 1 and "edit 2 (inpaint)" in err and "out of memory" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in steps.iterdir()] == ["astronaut.01-inpaint.png"]
    step_one = json.loads(Image.open(steps / "astronaut.01-inpaint.png").info["qimg"])
    assert [e["prompt"] for e in step_one["lineage"]] == ["one"]

    monkeypatch.setattr(QwenImageTransformer, "forward", forward)
    code, report, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", out)
    assert code == 0, err
    assert [e["cache"] for e in report["lineage"]] == ["hit", "miss"]


@pytest.mark.slow
def test_output_records_the_lineage(tiny_model_dir, photo, tmp_path, cli, one_thread):
    chain_file = write_chain(tmp_path / "c", """
steps: 1
cfg: 1
edits:
  - inpaint: {rect: "10,10,40,40", prompt: "一只猫"}
  - outpaint: {to: 240x160, prompt: "a street", seed: 9}
""")
    out = tmp_path / "o.png"
    code, report, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", out, "--seed", "4")
    assert code == 0, err
    meta = json.loads(Image.open(out).info["qimg"])
    assert meta["chain"]["name"] == chain_file.name and meta["input"]["name"] == photo.name
    assert [(e["index"], e["kind"], e["prompt"], e["seed"]) for e in meta["lineage"]] == [
        (1, "inpaint", "一只猫", 4), (2, "outpaint", "a street", 4)]  # --seed wins over the file
    assert meta["lineage"][1]["margins"] == [6, 7, 5, 5] and meta["lineage"] == report["lineage"]
    # The same shape as every output's metadata (metadata.output_params), read back by `qimg info`.
    code, info, err = cli.json("info", out, "--json")
    assert code == 0 and info == meta, err
    assert (meta["command"], meta["preset"], meta["model_fingerprint"]) == ("chain", None, fingerprint(tiny_model_dir))
    assert meta["lineage"][0]["attn_mask"] == "off" and len(meta["lineage"][0]["mask_sha256"]) == 64


@pytest.mark.slow
def test_chain_on_an_earlier_output_takes_its_latent_from_the_cache(tiny_model_dir, photo, tmp_path, cli,
                                                                    monkeypatch, one_thread):
    """The first edit of a chain starts from the input's cached latent, as `qimg inpaint` does: no VAE encode."""
    from qimg.model import vae

    encodes, encoder_forward = [], vae.Encoder.forward
    monkeypatch.setattr(vae.Encoder, "forward",
                        lambda self, x: encodes.append(1) or encoder_forward(self, x))
    first = tmp_path / "1.png"
    code, report, err = cli.json("inpaint", photo, "-p", "a cat", "--rect", "10,10,40,40", "--steps", "1",
                                 "--seed", "1", "--device", "cpu", "-m", tiny_model_dir, "--json", "--cache-dir",
                                 tmp_path / "cache", "-o", first)
    assert code == 0 and report["latent_cache"] == "miss" and len(encodes) == 1, err
    chain_file = write_chain(tmp_path / "c", 'steps: 1\nedits:\n  - inpaint: {rect: "60,60,30,30", prompt: "a cat"}\n')
    code, report, err = chain(cli, tiny_model_dir, first, chain_file, tmp_path, "-o", tmp_path / "2.png")
    assert code == 0 and report["lineage"][0]["cache"] == "miss" and len(encodes) == 1, err


@pytest.mark.slow
def test_options_layer_edit_over_its_preset_over_file_defaults(tiny_model_dir, photo, tmp_path, cli, one_thread):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "soft.yaml").write_text("strength: 0.5\ncfg: 1.5\n")
    (tmp_path / "fast.yaml").write_text("steps: 1\n")
    chain_file = write_chain(tmp_path / "c", """
seed: 1
cfg: 1
steps: 3
edits:
  - inpaint: {rect: "10,10,40,40", prompt: "a", preset: c/soft.yaml, cfg: 2}
  - inpaint: {rect: "10,10,40,40", prompt: "b"}
""".replace("c/soft.yaml", str(tmp_path / "c" / "soft.yaml")))
    code, report, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "--preset", tmp_path / "fast.yaml")
    assert code == 0, err
    assert [(e["steps"], e["cfg"], e["strength"], e["preset"] and e["preset"]["name"]) for e in report["lineage"]] == [
        (1, 2.0, 0.5, "soft.yaml"), (1, 1.0, 1.0, None)]  # a preset file by name (and sha256), not its folder


@pytest.mark.parametrize("edits, fragments", [
    ('  - inpaint: {rect: "0,0,9,9", prompt: x}\n  - inpaint: {rects: "0,0,9,9", prompt: x}\n',
     ["edit 2 (inpaint)", "unknown key 'rects'", "allowed:", "rect"]),
    ('  - inpaint: {rect: "0,0,9,9", prompt: x, steps: many}\n', ["edit 1 (inpaint)", "steps must be a whole number"]),
    ('  - inpaint: {rect: "0,0,9,9", prompt: x, model: other}\n', ["edit 1 (inpaint)", "unknown key 'model'"]),
    ('  - outpaint: {right: 16, prompt: x}\n  - inpaint: {mask: nope.png, prompt: x}\n',
     ["edit 2 (inpaint)", "nope.png", "no such file"]),
    ('  - inpaint: {rect: "0,0,9,9"}\n', ["edit 1 (inpaint)", "--prompt"]),
    ('  - outpaint: {prompt: x}\n', ["edit 1 (outpaint)", "nothing to outpaint"]),
    ('  - inpaint: {rect: "0,0,9,9", prompt: x, attn_mask: maybe}\n',
     ["edit 1 (inpaint)", "attn_mask", "not one of 'on', 'off'"]),
    ('  - blur: {radius: 3}\n', ["edit 1", "expected {inpaint"]),
    ('  - inpaint: {rect: "0,0,9,9", prompt: x, out_dir: o}\n', ["edit 1 (inpaint)", "unknown key 'out_dir'"]),
    ('  - outpaint: {right: 16, prompt: x, ray_workers: 2}\n', ["edit 1 (outpaint)", "unknown key 'ray_workers'"]),
    ('  - inpaint: {rect: "0,0,9,9", prompt: x, no_cache: true}\n', ["edit 1 (inpaint)", "unknown key 'no_cache'"]),
    ('  - inpaint: {rect: "0,0,9,9", prompt: x, devices: "cpu,cpu"}\n', ["edit 1 (inpaint)", "unknown key 'devices'"]),
    ('  - outpaint: {right: 16, prompt: x, split: "1,1"}\n', ["edit 1 (outpaint)", "unknown key 'split'"]),
    ('  - inpaint: {rect: "0,0,9,9", prompt: x, vae: v.safetensors}\n', ["edit 1 (inpaint)", "unknown key 'vae'"]),
    ('devices: "cpu,cpu"\nedits:\n  - inpaint: {rect: "0,0,9,9", prompt: x}\n', ["unknown key 'devices'"]),
    ('split: "1,1"\nedits:\n  - inpaint: {rect: "0,0,9,9", prompt: x}\n', ["unknown key 'split'"]),
    ('  - inpaint: [1, 2]\n', ["edit 1 (inpaint)", "expected a mapping"]),
    ('  []\n', ["needs `edits:`"]),
])
def test_bad_chain_names_the_edit_and_key_and_writes_nothing(tiny_model_dir, photo, tmp_path, cli, edits, fragments):
    chain_file = write_chain(tmp_path / "c", edits if "edits:" in edits else "edits:\n" + edits)
    out = tmp_path / "o.png"
    code, _, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in [str(chain_file), *fragments]:
        assert fragment in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_unknown_top_level_key_lists_the_shared_options(tiny_model_dir, photo, tmp_path, cli):
    chain_file = write_chain(tmp_path / "c", 'rect: "0,0,9,9"\nedits:\n  - inpaint: {prompt: x}\n')
    code, _, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path)
    assert code == 2 and "unknown key 'rect'" in err and "seed" in err and "feather" in err


# --- outputs, files read, interrupts, the cache: the error policy of the other commands holds for chains ----

TWO_EDITS = """
seed: 2
cfg: 1
steps: 1
edits:
  - inpaint: {rect: "10,10,40,40", prompt: "one"}
  - outpaint: {right: 16, prompt: "two", feather: 4}
"""


@pytest.mark.slow
def test_keep_steps_and_out_follow_the_overwrite_policy(tiny_model_dir, configs_only, photo, tmp_path, cli,
                                                         one_thread):
    chain_file = write_chain(tmp_path / "c", TWO_EDITS)
    out, steps = tmp_path / "o.png", tmp_path / "steps"
    code, _, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", out, "--keep-steps", steps)
    assert code == 0, err
    names = ["astronaut.01-inpaint.png", "astronaut.02-outpaint.png"]
    assert sorted(p.name for p in steps.iterdir()) == names
    made = {p: p.read_bytes() for p in [out, *steps.iterdir()]}

    # Refused before the model loads (configs_only would stop at the loader with exit 1), naming the file.
    for args, fragment in [(["-o", out], f"--out {out} exists"),
                           (["-o", tmp_path / "new.png", "--keep-steps", steps],
                            f"--keep-steps file {steps / names[0]} exists"),
                           (["-o", steps / names[1], "--keep-steps", steps, "--overwrite"],
                            "also a --keep-steps file")]:
        code, _, err = cli.json("chain", photo, chain_file, "-m", configs_only, "--cache-dir", tmp_path / "cache",
                                *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
        assert "--overwrite" in err or "choose another name" in err
    assert {p: p.read_bytes() for p in [out, *steps.iterdir()]} == made and not (tmp_path / "new.png").exists()

    # --overwrite replaces them in place: the steps folder holds one run, nothing numbered.
    code, report, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", out, "--keep-steps", steps,
                              "--overwrite", "--seed", "3")
    assert code == 0 and report["seed"] == 3, err
    assert sorted(p.name for p in steps.iterdir()) == names
    assert json.loads(Image.open(steps / names[0]).info["qimg"])["seed"] == 3
    # Without --out a taken default name is numbered, as for every command.
    own = tmp_path / "mine" / "astronaut.png"
    own.parent.mkdir()
    own.write_bytes(photo.read_bytes())
    code, report, err = chain(cli, tiny_model_dir, own, chain_file, tmp_path)
    code, again, err = chain(cli, tiny_model_dir, own, chain_file, tmp_path)
    assert code == 0 and (report["output"], again["output"]) == (
        str(own.parent / "astronaut.chain.png"), str(own.parent / "astronaut.chain-2.png")), err


@pytest.mark.slow
def test_chain_paths_are_relative_to_the_chain_file_and_never_written(tiny_model_dir, photo, tmp_path, cli,
                                                                       monkeypatch, one_thread):
    folder = tmp_path / "project"
    (folder / "masks").mkdir(parents=True)
    m = np.zeros((150, 227), np.uint8)
    m[20:60, 30:90] = 255
    Image.fromarray(m).save(folder / "masks" / "m.png")
    chain_file = write_chain(folder, 'steps: 1\ncfg: 1\nseed: 1\nedits:\n  - inpaint: {mask: masks/m.png, prompt: x}\n')
    before = {p: p.read_bytes() for p in (chain_file, folder / "masks" / "m.png")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the mask is found from the chain file's folder, not the working folder

    code, report, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", "out.png")
    assert code == 0 and (elsewhere / "out.png").exists(), err
    assert report["lineage"][0]["mask_sha256"] == array_hash(m.astype(np.float32) / 255)

    for args in (["-o", folder / "masks" / "m.png"], ["-o", folder / "masks" / "m.png", "--overwrite"]):
        code, _, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, *args)
        assert code == 2 and "a file this run reads" in err and "never replaces" in err, err
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow
def test_interrupted_chain_names_the_steps_it_wrote(tiny_model_dir, photo, tmp_path, cli, monkeypatch, one_thread):
    import os
    import signal

    chain_file = write_chain(tmp_path / "c", TWO_EDITS)
    calls, forward = [], QwenImageTransformer.forward

    def forward_then_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # edit 1 ran its step and was written; Ctrl-C during edit 2
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(QwenImageTransformer, "forward", forward_then_ctrl_c)
    out, steps = tmp_path / "o.png", tmp_path / "steps"
    code, _, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", out, "--keep-steps", steps)
    assert code == 130 and err.strip() == f"qimg: interrupted after writing {steps / 'astronaut.01-inpaint.png'}"
    assert not out.exists() and [p.name for p in steps.iterdir()] == ["astronaut.01-inpaint.png"]
    assert leftovers(steps) == [] and leftovers(tmp_path) == []


@pytest.mark.slow
def test_damaged_cached_edits_are_reported_recomputed_and_rebuilt(tiny_model_dir, photo, tmp_path, cli,
                                                                  one_thread):
    chain_file = write_chain(tmp_path / "c", TWO_EDITS)
    code, first, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", tmp_path / "1.png")
    assert code == 0, err
    entries = sorted((tmp_path / "cache" / "chain").glob("*/*.safetensors"))
    assert len(entries) == 2
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:-50])  # truncated, as by a full disk or a killed copy
    code, again, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", tmp_path / "2.png")
    assert code == 0 and [e["cache"] for e in again["lineage"]] == ["miss", "miss"], err
    assert err.count("qimg: warning: cache entry") == 2 and "damaged" in err and "Traceback" not in err
    assert np.array_equal(pixels(tmp_path / "1.png"), pixels(tmp_path / "2.png"))
    code, third, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", tmp_path / "3.png")
    assert code == 0 and [e["cache"] for e in third["lineage"]] == ["hit", "hit"] and "warning" not in err


EDIT = '{inpaint: {rect: "0,0,9,9", prompt: x}}'
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, fragments", [
    ("!!python/object/apply:os.system ['touch PWNED']\n", ["not valid YAML", "python/object/apply"]),
    ("edits:\n  - !!python/object/new:os.system [touch PWNED]\n", ["not valid YAML"]),
    ("edits:\n  - inpaint: {prompt: !!python/name:os.system , rect: '0,0,9,9'}\n", ["not valid YAML"]),
    (BOMB + "edits: *i\n", ["unknown key 'a'"]),
    ("e: &e " + EDIT + "\nedits: [*e]\n", ["unknown key 'e'"]),
    ("edits: [&e " + EDIT + ", " + ", ".join(["*e"] * 100) + "]\n", ["101 edits", "the limit is 100"]),
    ("edits: *nowhere\n", ["not valid YAML", "undefined alias"]),
    ("edits:\n  - " + EDIT + "\n  - inpaint: {rect: '0,0,9,9', prompt: x, prompt: y}\n",
     ["not valid YAML", "line 3", "key 'prompt' is given twice", "edit 2 > inpaint"]),
    ("edits: []\nedits: [" + EDIT + "]\n", ["not valid YAML", "key 'edits' is given twice"]),
    ('prompt: "\\ud800"\nedits: [' + EDIT + "]\n", ["not valid YAML", "lone surrogate", "(in prompt)"]),
    ("edits:\n\t- " + EDIT + "\n", ["not valid YAML", "line 2"]),
    pytest.param("edits: " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"], marks=pytest.mark.slow),
    ("# " + "x" * 300_000 + "\nedits: []\n", ["over 262144 bytes"]),
    ("edits:\n  - inpaint: {rect: '0,0,9,9', prompt: x, preset: /dev/zero}\n", ["edit 1 (inpaint)", "/dev/zero",
                                                                                 "a character device"]),
    ("edits:\n  - inpaint: {rect: '0,0,9,9', prompt: x, mask: /dev/zero}\n", ["edit 1 (inpaint)", "/dev/zero",
                                                                               "not an image file"]),
    ("edits:\n  - inpaint: {rect: '0,0,9,9', prompt: 2020-01-01}\n", ["prompt must be text", "a date"]),
    ("edits:\n  - {inpaint: {rect: '0,0,9,9', prompt: x}, outpaint: {right: 16, prompt: x}}\n",
     ["edit 1", "expected {inpaint"]),
    ("edits:\n  - inpaint: {rect: '0,0,9,9', prompt: x, overwrite: true}\n", ["unknown key 'overwrite'"]),
])
def test_hostile_chain_files_are_one_line_and_run_nothing(tiny_model_dir, photo, tmp_path, cli, monkeypatch, text,
                                                          fragments):
    monkeypatch.chdir(tmp_path)  # where a `touch PWNED` would land
    chain_file = write_chain(tmp_path / "c", text)
    code, _, err = chain(cli, tiny_model_dir, photo, chain_file, tmp_path, "-o", tmp_path / "o.png")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and len(lines[0]) < 600, err
    for fragment in [str(chain_file), *fragments]:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("raw, fragment", [(b"edits:\n  - inpaint: {prompt: caf\xe9}\n", "not valid YAML"),
                                           (b"edits: []\x00\n", "not valid YAML"),
                                           (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not valid YAML")])
def test_chain_files_that_are_not_utf8_text(tiny_model_dir, photo, tmp_path, cli, raw, fragment):
    (tmp_path / "c.yaml").write_bytes(raw)
    code, _, err = chain(cli, tiny_model_dir, photo, tmp_path / "c.yaml", tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_merge_keys_stay_allowed_and_a_key_beside_them_wins(tmp_path):
    from qimg.cli.presets import read_yaml

    path = write_chain(tmp_path, "edits:\n  - inpaint: &e {rect: '0,0,9,9', prompt: x, steps: 1}\n"
                                 "  - inpaint: {<<: *e, steps: 2}\n")
    assert [e["inpaint"]["steps"] for e in read_yaml(path, "chain")["edits"]] == [1, 2]


BIG_CHAIN = "prompt: x\nedits:\n  - outpaint: {to: 4000x4000}\n" + "  - inpaint: {rect: '0,0,100%,100%'}\n" * 24


@pytest.mark.slow
def test_a_wrong_model_fails_before_the_chain_is_planned(photo, tmp_path, cli, monkeypatch):
    # Reading the file is bounded (256 KB, checked when the command line is parsed); planning its edits on the
    # input is the costly part, and the model comes first.
    from qimg.jobs import chain_plan as chains

    monkeypatch.setattr(chains, "plan", lambda *a: pytest.fail("planned the chain before finding the model"))
    chain_file = write_chain(tmp_path, BIG_CHAIN)
    for model in [tmp_path / "nope", "x y/z", "a/b/c"]:
        code, _, err = cli.json("chain", photo, chain_file, "-m", model, "--device", "cpu")
        assert code == 2 and err.strip() == f"qimg: error: model folder not found: {model}", err


@pytest.mark.slow
def test_planning_a_long_chain_on_a_large_canvas_holds_one_mask_at_a_time(configs_only, photo, tmp_path, cli,
                                                                        monkeypatch):
    """An outpaint to 4000x4000 then 24 full-canvas edits: planning once kept a float32 mask per edit (1.6 GB)."""
    import tracemalloc

    from qimg.errors import QimgError
    from qimg.jobs import chain_plan as chains

    plan, peaks = chains.plan, []

    def measured(*args):
        tracemalloc.start()
        try:
            assert len(plan(*args)) == 25
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        raise QimgError("planned")  # stop before the canvas is built and the model loads

    monkeypatch.setattr(chains, "plan", measured)
    code, _, err = cli.json("chain", photo, write_chain(tmp_path, BIG_CHAIN), "-m", configs_only, "--device", "cpu")
    assert code == 1 and "planned" in err and len(peaks) == 1, err
    assert peaks[0] < 200 * 2**20, f"{peaks[0] / 2**20:.0f} MB"
