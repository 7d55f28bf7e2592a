"""Fuzzing: the parsers take any text and either answer within their contract or raise UsageError; a few
hundred mutated image files through the CLI (as image and as mask) each end in a clean exit, never a crash.

The CLI runs use a model folder with configs and no weights, so an input that is accepted stops at the
weight loader (exit 1, 'no .safetensors weights'): everything about the input was checked by then.
"""

import io
import random
import warnings
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data

from qimg import masks
from qimg.cli import parse_size, run
from qimg.errors import UsageError

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
    import struct
    import zlib

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
