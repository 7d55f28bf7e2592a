"""Fuzzing: the parsers take any text and either answer within their contract or raise UsageError; a few
hundred mutated image files through the CLI (as image and as mask) each end in a clean exit, never a crash.

The CLI runs use a model folder with configs and no weights, so an input that is accepted stops at the
weight loader (exit 1, 'no .safetensors weights'): everything about the input was checked by then.
"""

import functools
import io
import json
import random
import re
import shutil
import struct
import unicodedata
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
import typer
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data

from qimg import masks
from qimg.cli import presets
from qimg.cli.app import app, run
from qimg.errors import UsageError
from qimg.jobs.metadata import png_text
from qimg.option_values import MAX_DIGITS, parse_size

fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(alphabet=st.sampled_from("0123456789x%,.-+ eE\t×a"), max_size=20) | st.text(max_size=12)


@fast
@given(TEXT)
def test_parse_size_accepts_only_positive_multiples(text):
    try:
        w, h = parse_size(text)
    except UsageError as e:
        assert "--size" in str(e)
        return
    assert w > 0 and h > 0 and w % 16 == 0 and h % 16 == 0
    assert parse_size(f"{w}x{h}") == (w, h)


@fast
@given(TEXT, st.integers(1, 300), st.integers(1, 300))
def test_parse_rect_gives_a_box_inside_the_image_or_refuses(text, width, height):
    try:
        x0, y0, x1, y1 = masks.parse_rect(text, width, height)
    except UsageError as e:
        assert "--rect" in str(e)
        return
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


@fast
@given(st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: f"{v:.3f}"),
                          st.integers(-200, 200).map(lambda v: f"{v}%")), min_size=4, max_size=4),
       st.integers(1, 200), st.integers(1, 200))
def test_numeric_rects_never_crash(parts, width, height):
    try:
        x0, y0, x1, y1 = masks.parse_rect(",".join(map(str, parts)), width, height)
    except UsageError:
        return
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 3), st.integers(31, 6000), st.sampled_from(["", "%", ".5", "-"]), st.integers(1, 200))
def test_rects_with_huge_numbers_are_refused_in_one_line(at, digits, decoration, size):
    """int() refuses over 4300 digits (ValueError 'Exceeds the limit'); such a value is never a real edge."""
    value = "9" * digits
    value = "-" + value if decoration == "-" else value + decoration
    parts = ["1", "1", "5", "5"]
    parts[at] = value
    with pytest.raises(UsageError, match="--rect .*over 30 digits"):
        masks.parse_rect(",".join(parts), size, size)


def test_every_number_an_option_reads_has_the_one_digit_bound(tmp_path):
    """--rect, --size/--to, --cache-size and a --lora scale: MAX_DIGITS digits pass the bound, one more is refused."""
    from qimg.cache import parse_bytes
    from qimg.weights.lora import parse_spec

    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    parsers = {"--rect": lambda v: masks.parse_rect(f"0,0,{v},5", 64, 64), "--size": lambda v: parse_size(f"{v}x16"),
               "--cache-size": parse_bytes, "--lora": lambda v: parse_spec(f"{lora}:{v}")}
    for option, parse in parsers.items():
        parse("0" * (MAX_DIGITS - 2) + "16")
        with pytest.raises((UsageError, ValueError)):
            parse("0" * (MAX_DIGITS - 1) + "16")


@pytest.mark.slow
@fast
@given(st.dictionaries(st.from_regex(r"k[a-z_]{0,7}", fullmatch=True), st.integers(0, 9), min_size=1, max_size=6),
       st.data())
def test_yaml_with_a_key_given_twice_is_refused_naming_it(tmp_path_factory, mapping, data):
    key = data.draw(st.sampled_from(sorted(mapping)))
    nested = data.draw(st.booleans())
    lines = [f"{k}: {v}" for k, v in mapping.items()]
    lines.insert(data.draw(st.integers(0, len(lines))), f"{key}: 1")
    text = "outer:\n" + "".join(f"  {line}\n" for line in lines) if nested else "".join(f"{line}\n" for line in lines)
    path = tmp_path_factory.getbasetemp() / "dup.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        presets.read_yaml(path, "preset")
    assert f"key {key!r} is given twice" in str(e.value) and str(path) in str(e.value)
    assert ("(in outer)" in str(e.value)) == nested


@fast
@given(st.integers(1, 400), st.integers(1, 400), st.lists(st.integers(-50, 10**5), min_size=5, max_size=5),
       st.none() | st.tuples(st.integers(-10, 10**5), st.integers(-10, 10**5)), st.text(max_size=12) | st.sampled_from(
           sorted(masks.ANCHORS)))
def test_outpaint_margins_grow_the_canvas_or_refuse(w, h, sides, to, anchor):
    try:
        left, right, top, bottom = masks.outpaint_margins((w, h), *sides, to=to, anchor=anchor)
    except UsageError:
        return
    assert min(left, right, top, bottom) >= 0 and left + right + top + bottom > 0
    if to is not None:
        assert (w + left + right, h + top + bottom) == to


binary = st.integers(0, 2**20).map(lambda seed: np.random.default_rng(seed).random((9, 11)) > 0.8)


def brute_grow(m: np.ndarray, px: int) -> np.ndarray:
    ys, xs = np.indices(m.shape)
    d2 = (ys.ravel()[:, None] - ys.ravel()[None]) ** 2 + (xs.ravel()[:, None] - xs.ravel()[None]) ** 2
    return np.where(d2 <= px * px, m.ravel()[None], 0).max(axis=1).reshape(m.shape)


@fast
@given(binary, st.integers(0, 30) | st.integers(10**6, 10**12))
def test_grow_by_any_radius_is_the_max_over_the_disk(m, px):
    np.testing.assert_array_equal(masks.grow(m.astype(np.float32), px), brute_grow(m.astype(np.float32), px))


@fast
@given(binary, st.integers(1, 30) | st.integers(10**6, 10**12))
def test_feather_by_any_radius_stays_in_range_and_keeps_the_mask(m, px):
    f = masks.feather(m.astype(np.float32), px)
    assert f.dtype == np.float32 and (f >= m).all() and (f <= 1).all()


# --- mutated files through the CLI ---------------------------------------------------------------------


def seed_files() -> dict[str, bytes]:
    """Small real photos in the formats people have, as bytes."""
    out = {}
    for name, pixels in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("camera", data.camera())):
        img = Image.fromarray(pixels).resize((48, 32))
        for fmt, kw in (("png", {}), ("jpeg", {"quality": 80}), ("gif", {}), ("tiff", {}), ("bmp", {}),
                        ("webp", {})):
            buf = io.BytesIO()
            img.save(buf, format=fmt, **kw)
            out[f"{name}.{fmt}"] = buf.getvalue()
    return out


def png_chunks(raw: bytes):
    """(offset, length, type) of each chunk of a PNG."""
    pos, chunks = 8, []
    while pos + 8 <= len(raw):
        length = int.from_bytes(raw[pos:pos + 4], "big")
        chunks.append((pos, length, raw[pos + 4:pos + 8]))
        pos += 12 + length
    return chunks


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One damaged copy: byte flips, a truncation, a header field rewritten (CRC fixed, so Pillow believes
    it), a chunk's length lied about, or bytes spliced in."""
    b = bytearray(raw)
    kind = rng.choice(["flip", "flips", "truncate", "header", "length", "splice", "zero run"])
    if kind == "flip":
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "flips":
        for _ in range(rng.randint(2, 30)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "truncate":
        b = b[: rng.randrange(len(b))]
    elif kind == "header" and raw.startswith(b"\x89PNG"):
        w, h, depth, colour = (rng.choice([0, 1, 3, 2**31 - 1, 2**32 - 1, 48, 65536, 40000]),
                               rng.choice([0, 1, 32, 2**31 - 1, 30000]), rng.choice([1, 2, 4, 8, 16, 3, 0]),
                               rng.choice([0, 2, 3, 4, 6, 1, 7]))
        ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, rng.choice([0, 1]), rng.choice([0, 1]))
        b[16:29] = ihdr
        b[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    elif kind == "length" and raw.startswith(b"\x89PNG"):
        pos, _, _ = rng.choice(png_chunks(raw))
        b[pos:pos + 4] = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 10**6]).to_bytes(4, "big")
    elif kind == "splice":
        at = rng.randrange(len(b))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        at = rng.randrange(len(b))
        b[at:at + rng.randint(1, 200)] = bytes(min(200, len(b) - at))
    return kind, bytes(b)


CASES = 300


@pytest.mark.slow
def test_mutated_images_and_masks_end_cleanly(tmp_path, configs_only, capsys):
    rng = random.Random(7)
    seeds = seed_files()
    good = tmp_path / "good.png"
    good.write_bytes(seeds["astronaut.png"])
    outcomes, kinds = Counter(), Counter()
    for i in range(CASES):
        name = rng.choice(sorted(seeds))
        if rng.random() < 0.6:
            name = rng.choice([n for n in seeds if n.endswith(".png")])
        kind, raw = mutate(seeds[name], rng)
        path = tmp_path / f"m{i}.{name.split('.')[1]}"
        path.write_bytes(raw)
        role = "image" if i % 2 == 0 else "mask"
        args = ([str(path), "--rect", "0,0,8,8"] if role == "image"
                else [str(good), "--mask", str(path), "--mask-resize"])
        with warnings.catch_warnings(record=True) as passed_through:  # anything not shown as a qimg line
            warnings.simplefilter("always")
            code = run(["inpaint", *args, "-p", "x", "-m", str(configs_only), "-o", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert "Traceback" not in err and len(lines) >= 1 and not passed_through, (name, kind, err, passed_through)
        assert all(line.startswith("qimg: warning: ") for line in lines[:-1]), (name, kind, err)
        outcomes["with a warning"] += len(lines) > 1
        last = lines[-1]
        if code == 2:  # refused: the message names the file as image or mask
            assert last.startswith(f"qimg: error: {role} {path}") or "selects nothing" in last, (name, kind, last)
            outcomes["refused"] += 1
        else:  # accepted, then stopped at the (absent) weights
            assert code == 1 and "no .safetensors weights" in last, (name, kind, code, last)
            outcomes["accepted"] += 1
        kinds[kind] += 1
        assert not (tmp_path / "o.png").exists()
    print(f"\n{CASES} mutated files: {dict(outcomes)}; mutations: {dict(kinds)}")
    assert outcomes["refused"] > 50 and outcomes["accepted"] > 20  # the mix exercises both paths


# --- presets, chain files and PNG metadata through the CLI -----------------------------------------------
#
# Every run must end with exit 0, 1 or 2, stderr holding `qimg: warning:` lines and at most one
# `qimg: error:` line, no traceback, and no "(rerun with --debug for details)": that line is the catch-all
# for exceptions qimg did not foresee, so its absence means every failure was one qimg understood.
# Accepted presets and chains go on to a model folder with configs and no weights and stop at the weight
# loader (exit 1); the model is found before a chain file is read, so it must be a valid one.

cli_fuzz = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def clean_run(cli, args: list) -> tuple[int, str, str]:
    """Run the CLI, check that it ended cleanly, return (code, stdout, the error line or '')."""
    with warnings.catch_warnings(record=True) as passed_through:
        warnings.simplefilter("always")
        code, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert code in (0, 1, 2) and "Traceback" not in err and not passed_through, (args, code, err, passed_through)
    assert "rerun with --debug" not in err, (args, err)  # an exception qimg did not foresee
    errors = [line for line in lines if not line.startswith("qimg: warning: ")]
    assert len(errors) == (code != 0) and all(line.startswith("qimg: error: ") for line in errors), (args, err)
    return code, out, errors[0] if errors else ""


COMMANDS = typer.main.get_command(app)


def command_options(name: str) -> list[str]:
    return sorted(presets.option_params(COMMANDS.commands[name]))


EDIT_KEYS = sorted(set(command_options("inpaint")) | set(command_options("outpaint")))
# what a YAML value can be: scalars of every YAML type, plausible option values, and nested structures
SCALARS = (st.integers(-2**70, 2**70) | st.floats() | st.booleans() | st.none() | st.text(max_size=20)
           | st.sampled_from(["on", "off", "0,0,9,9", "10%,10%,50%,50%", "-5,0,9,9", "64x64", "0x16", "center",
                              "top-left", "a cat", "masks/m.png", "/dev/zero", "../../m.png", "fast", "quality",
                              "1e400", ".nan", "2GB", "cpu", "float16", "~"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(EDIT_KEYS) | st.text(max_size=6), inner, max_size=3),
                      max_leaves=8)
HOSTILE = ["", "!!python/object/apply:os.system ['touch PWNED']\n", "x: !!python/name:os.system\n",
           "a: &a [1, 2]\nb: [*a, *a, *a]\n", "<<: *a\n", "\t", "%YAML 1.1\n---\n", "--- !!map\n", "? [a]\n: 1\n",
           "...\n", "key: |\n  text\n", "steps: &s 2\ncfg: *s\n"]


def yaml_text(doc, hostile: str, at_end: bool) -> str:
    text = yaml.safe_dump(doc, allow_unicode=True, default_flow_style=bool(hash(str(doc)) % 2))
    return text + hostile if at_end else hostile + text


@pytest.fixture(scope="module")
def yaml_place(tmp_path_factory, configs_only):
    """A folder to run in: a small photo, a mask for chains, a model folder with configs and no weights."""
    folder = tmp_path_factory.mktemp("yaml-fuzz")
    Image.fromarray(data.astronaut()[::16, ::16]).save(folder / "in.png")  # 32x32
    (folder / "masks").mkdir()
    Image.new("L", (32, 32), 255).save(folder / "masks" / "m.png")
    shutil.copytree(configs_only, folder / "noweights")
    return folder


def check_nothing_written(folder):
    assert not (folder / "PWNED").exists() and not (folder / "o.png").exists()
    assert sorted(p.name for p in folder.glob("*.png")) == ["in.png"]


def run_preset(cli, folder, text: bytes | str, command: str = "generate"):
    path = folder / "p.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    first = {"generate": ["-p", "x"], "inpaint": [folder / "in.png", "-p", "x", "--rect", "0,0,9,9"],
             "outpaint": [folder / "in.png", "-p", "x", "--right", "16"]}[command]
    code, _, line = clean_run(cli, [command, *first, "-m", folder / "noweights", "-o", folder / "o.png",
                                       "--preset", path])
    check_nothing_written(folder)
    return code, line, path


def run_chain(cli, folder, text: bytes | str):
    path = folder / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    code, _, line = clean_run(cli, ["chain", folder / "in.png", path, "-m", folder / "noweights",
                                       "-o", folder / "o.png", "--no-cache"])
    check_nothing_written(folder)
    return code, line, path


def accepted(line: str) -> bool:
    return "noweights" in line and "no .safetensors weights" in line


@pytest.mark.slow
@cli_fuzz
@given(st.dictionaries(st.sampled_from(command_options("generate")) | st.text(max_size=8), VALUES, max_size=5) | VALUES,
       st.sampled_from(HOSTILE), st.booleans())
def test_fuzzed_presets_end_cleanly(yaml_place, cli, doc, hostile, at_end):
    code, line, path = run_preset(cli, yaml_place, yaml_text(doc, hostile, at_end))
    assert (code, accepted(line)) == (1, True) or code == 2 and (str(path) in line or "--size" in line), line


EDITS = st.lists(st.dictionaries(st.sampled_from(["inpaint", "outpaint", "blur"]),
                                 st.dictionaries(st.sampled_from(EDIT_KEYS), VALUES, max_size=5)
                                 | st.fixed_dictionaries({"prompt": st.just("x")}, optional={
                                     "rect": st.sampled_from(["0,0,9,9", "50%,50%,10%,10%", "40,40,9,9"]),
                                     "mask": st.sampled_from(["masks/m.png", "masks/none.png", "/dev/zero"]),
                                     "right": st.integers(-1, 40), "feather": st.integers(0, 10**9),
                                     "strength": st.floats(-1, 2), "seed": st.integers(-1, 2**64)}),
                                 min_size=1, max_size=2), max_size=4)


@pytest.mark.slow
@cli_fuzz
@given(st.fixed_dictionaries({"edits": EDITS}, optional={"seed": VALUES, "steps": VALUES, "prompt": VALUES,
                                                        "rect": VALUES}) | VALUES,
       st.sampled_from(HOSTILE), st.booleans())
def test_fuzzed_chain_files_end_cleanly(yaml_place, cli, doc, hostile, at_end):
    code, line, path = run_chain(cli, yaml_place, yaml_text(doc, hostile, at_end))
    assert (code, accepted(line)) == (1, True) or code == 2 and str(path) in line, line
    edits = doc.get("edits") if isinstance(doc, dict) else None
    if " edit " in line and isinstance(edits, list):  # the edit an error names is one the file has
        assert int(line.split(" edit ")[1].split()[0].rstrip(":")) <= len(edits), line


TOKENS = [": ", "- ", "&a ", "*a", "!!python/object/apply:os.system ['touch PWNED']", "{", "}", "[", "]", "\t",
          "\x00", "'", '"', "<<: *a", "? ", "|", ">", "%YAML 1.1\n", "---\n", "...\n", "\ufeff", "\ud800", "#",
          "99999999999999999999", "-1", ".nan", ".inf", "0x10", "1_000", "null", "yes", "!!binary AAAA", ", ",
          "\n  ", "\n- ", "[" * 300]


def mutate_text(text: str, rng: random.Random) -> tuple[str, str]:
    """One damaged copy of a YAML file: a token inserted, a span deleted or duplicated, lines swapped."""
    kind = rng.choice(["insert", "insert", "delete", "duplicate", "swap lines", "replace number", "truncate"])
    at = rng.randrange(len(text) + 1)
    if kind == "insert":
        text = text[:at] + rng.choice(TOKENS) + text[at:]
    elif kind == "delete":
        text = text[:at] + text[at + rng.randint(1, 12):]
    elif kind == "duplicate":
        text = text[:at] + text[at:at + rng.randint(1, 40)] * rng.randint(2, 5) + text[at:]
    elif kind == "swap lines":
        lines = text.splitlines(keepends=True)
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        text = "".join(lines)
    elif kind == "replace number":
        text = re.sub(r"\d+", lambda m: rng.choice(["0", "-7", "1e9", "65537", "2.5", "x", m[0] * 30]), text, count=1)
    else:
        text = text[:at]
    return kind, text


CHAIN_SEEDS = [
    'seed: 7\nsteps: 1\nedits:\n  - inpaint: {rect: "4,4,12,9", prompt: "a red lantern"}\n'
    '  - outpaint: {right: 16, prompt: "a night street", feather: 4}\n'
    '  - inpaint: {mask: masks/m.png, prompt: "a neon sign", preset: fast, grow: 1}\n',
    "cfg: 1\nedits:\n- inpaint:\n    rect: [0,0,9,9, '50%,50%,10%,10%']\n    prompt: |\n      two lines\n"
    "      of prompt\n    strength: 0.5\n- outpaint: {to: 48x40, anchor: top-left, prompt: x}\n",
]
YAML_CASES = 300


@pytest.mark.slow
def test_mutated_presets_and_chain_files_end_cleanly(yaml_place, cli):
    rng = random.Random(11)
    # edit needs an Edit model folder: the configs-only one is Qwen-Image's (edit's preset parsing is inpaint's)
    preset_seeds = [(p.read_text(), [c for c in presets.fitting_commands(COMMANDS, presets.read_yaml(p, "preset"))
                                     if c not in ("chain", "edit")]) for p in presets.bundled().values()]
    outcomes, kinds = Counter(), Counter()
    for i in range(YAML_CASES):
        if i % 2 == 0:
            text, fits = rng.choice(preset_seeds)
        else:
            text = rng.choice(CHAIN_SEEDS)
        for _ in range(rng.randint(1, 3)):
            kind, text = mutate_text(text, rng)
            kinds[kind] += 1
        if i % 2 == 0:
            code, line, path = run_preset(cli, yaml_place, text, rng.choice(fits))
        else:
            code, line, path = run_chain(cli, yaml_place, text)
        assert code == (1 if accepted(line) else 2), line
        outcomes["accepted" if accepted(line) else "refused naming the file" if str(path) in line
                 else "refused otherwise"] += 1
    print(f"\n{YAML_CASES} mutated YAML files: {dict(outcomes)}; mutations: {dict(kinds)}")
    assert outcomes["accepted"] > 20 and outcomes["refused naming the file"] > 50


# --- PNG metadata: `qimg info` on text chunks written by hand ----------------------------------------------


def png_with_chunks(*chunks: tuple[bytes, bytes]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    raw = buf.getvalue()
    iend = raw.rindex(b"IEND") - 4
    body = b"".join(struct.pack(">I", len(p)) + t + p + struct.pack(">I", zlib.crc32(t + p)) for t, p in chunks)
    return raw[:iend] + body + raw[iend:]


def itxt(text: bytes, keyword: bytes = b"qimg", compressed: bool = False) -> tuple[bytes, bytes]:
    payload = zlib.compress(text) if compressed else text
    return b"iTXt", keyword + b"\0" + bytes([compressed, 0]) + b"\0\0" + payload


def check_info(cli, path) -> tuple[int, dict | None]:
    """`qimg info` and `qimg info --json` on one file: clean ends; what is printed is data, never a command to
    the terminal; --json prints JSON that parses. Returns the exit code and the parameters --json gave."""
    code, out, line = clean_run(cli, ["info", path])
    if code == 0:
        assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in out.replace("\n", "")), repr(out)
    else:
        assert str(path) in line, line
    code_json, out, _ = clean_run(cli, ["info", path, "--json"])
    assert code_json == code
    params = json.loads(out) if code == 0 else None
    assert params is None or isinstance(params, dict)
    return code, params


PARAMS = {"qimg_version": "0.1.0", "command": "inpaint", "prompt": "a red sofa", "negative_prompt": " ", "seed": 7,
          "width": 64, "height": 48, "steps": 2, "cfg": 4.0, "input": "in.png", "box": [0, 0, 64, 48],
          "model": "/models/Qwen-Image", "preset": None, "lineage": []}


def mutate_metadata(rng: random.Random) -> tuple[str, bytes]:
    """A PNG whose qimg text chunk is damaged in one of many ways."""
    text = json.dumps(PARAMS, ensure_ascii=rng.random() < 0.3).encode()
    kind = rng.choice(["bytes", "json value", "nesting", "escape", "chunk type", "compression", "keyword",
                       "two chunks", "crc", "length"])
    if kind == "bytes":
        b = bytearray(text)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return kind, png_with_chunks(itxt(bytes(b)))
    if kind == "json value":
        value = rng.choice(['"\\u001b[2J\\u001b[31mred"', '"\\u202e\\u2066evil"', '"\\ud800"', '"\\udfff\\ud800"',
                            "1" * 5000, "-0.0", "1e999", "NaN", "-Infinity", '"\\u0000"', "[]", "{}", "null", "true",
                            '"' + "x" * 200_000 + '"', '{"' + "k" * 100 + '": 1}'])
        target = rng.choice(list(PARAMS))
        return kind, png_with_chunks(itxt(json.dumps({**PARAMS, target: 0}).replace(
            f'"{target}": 0', f'"{target}": {value}').encode()))
    if kind == "nesting":
        n = rng.choice([10, 500, 980, 1000, 5000, 100_000])
        return kind, png_with_chunks(itxt(("[" * n + "]" * n).encode() if rng.random() < 0.5
                                          else ('{"a":' + "[" * n + "]" * n + "}").encode()))
    if kind == "escape":
        return kind, png_with_chunks(itxt(text.replace(b'"a red sofa"', rng.choice(
            [b'"\\x1b"', b'"\\u00"', b'"\\ud800\\u"', b'"\xff\xfe"', b'"\xc3\x28"', b'"\xed\xa0\x80"']))))
    if kind == "chunk type":  # tEXt is Latin-1; zTXt is compressed Latin-1
        latin = text.replace(b"a red sofa", bytes(range(128, 256)))
        return kind, png_with_chunks(rng.choice([(b"tEXt", b"qimg\0" + latin),
                                                 (b"zTXt", b"qimg\0\0" + zlib.compress(latin)),
                                                 (b"zTXt", b"qimg\0\0" + b"not zlib data")]))
    if kind == "compression":
        compressed = rng.choice([zlib_bomb(), b"garbage", None])
        chunk = itxt(text, compressed=True) if compressed is None else (
            b"iTXt", b"qimg\0\x01\0\0\0" + compressed)
        return kind, png_with_chunks(chunk)
    if kind == "keyword":
        return kind, png_with_chunks(itxt(text, rng.choice([b"QIMG", b"qimg ", b"", b"q" * 80, b"qimg\xff"])))
    if kind == "two chunks":
        return kind, png_with_chunks(itxt(text), itxt(b'{"seed": "other"}'))
    raw = png_with_chunks(itxt(text))
    at = raw.index(b"iTXt")
    b = bytearray(raw)
    if kind == "crc":
        b[at + 4 + len(itxt(text)[1])] ^= 0xFF
    else:
        b[at - 4:at] = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 10**7]).to_bytes(4, "big")
    return kind, bytes(b)


@functools.cache
def zlib_bomb() -> bytes:
    return zlib.compress(b"\0" * 10_000_000, 9)  # 10 MB of text (Pillow's limit is 1 MB) from ~10 KB


METADATA_CASES = 200


@pytest.mark.slow
def test_mutated_png_metadata_ends_cleanly_and_prints_only_data(tmp_path, cli):
    rng = random.Random(5)
    outcomes, kinds = Counter(), Counter()
    for i in range(METADATA_CASES):
        kind, raw = mutate_metadata(rng)
        path = tmp_path / f"m{i}.png"
        path.write_bytes(raw)
        outcomes["read" if check_info(cli, path)[0] == 0 else "refused"] += 1
        kinds[kind] += 1
        path.unlink()
    print(f"\n{METADATA_CASES} PNGs with damaged metadata: {dict(outcomes)}; mutations: {dict(kinds)}")
    assert outcomes["read"] > 30 and outcomes["refused"] > 30


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)


@pytest.mark.slow
@cli_fuzz
@given(st.dictionaries(st.text(max_size=12), JSON, max_size=6))
def test_any_stored_parameters_read_back_exactly_as_data(tmp_path_factory, cli, params):
    """Whatever a qimg chunk holds (any text: control, bidi and format characters, any nesting), `qimg info
    --json` gives back exactly what was stored and plain `qimg info` prints it with nothing raw in it."""
    path = tmp_path_factory.getbasetemp() / "meta.png"
    path.write_bytes(png_with_chunks(itxt(png_text(params)["qimg"].encode())))
    assert check_info(cli, path) == (0, {"qimg_version": json.loads(png_text({})["qimg"])["qimg_version"], **params})
