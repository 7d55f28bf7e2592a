"""Masks: property tests for the math, example tests for every mask file convention (read by images.read_mask,
matched to the image by jobs/edit_inputs.load_mask) and every bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from qimg import masks
from qimg.errors import UsageError
from qimg.images import alpha_mask
from qimg.jobs.edit_inputs import load_mask

fast = settings(max_examples=50, deadline=None)


def mask_arrays(min_side=1, max_side=12, levels=(0.0, 0.25, 0.5, 1.0), shape=None):
    """Small masks: mostly 0/1 with some partial values, which is what real masks look like."""
    shape = shape if shape is not None else st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))
    return arrays(np.float32, shape, elements=st.sampled_from(levels))


def binary_masks(max_side=12):
    return mask_arrays(max_side=max_side, levels=(0.0, 1.0))


def brute_grow(m, px):
    """max over the digital disk dx^2 + dy^2 <= px^2, pixel by pixel."""
    h, w = m.shape
    out = np.zeros_like(m)
    for y in range(h):
        for x in range(w):
            for dy in range(-px, px + 1):
                for dx in range(-px, px + 1):
                    if dx * dx + dy * dy <= px * px and 0 <= y + dy < h and 0 <= x + dx < w:
                        out[y, x] = max(out[y, x], m[y + dy, x + dx])
    return out


def distance_to(m):
    """Euclidean distance from every pixel to the nearest pixel with m > 0 (inf if none)."""
    ys, xs = np.nonzero(m > 0)
    gy, gx = np.mgrid[: m.shape[0], : m.shape[1]]
    if ys.size == 0:
        return np.full(m.shape, np.inf)
    return np.sqrt((gy[..., None] - ys) ** 2 + (gx[..., None] - xs) ** 2).min(axis=-1)


# --- invert, grow, feather -------------------------------------------------------------------------------


@fast
@given(mask_arrays(levels=(0.0, 0.1, 0.3, 0.5, 0.7, 1.0)))
def test_invert_is_an_involution(m):
    np.testing.assert_allclose(masks.invert(masks.invert(m)), m, atol=1e-6)


@fast
@given(mask_arrays(), st.integers(0, 4))
def test_grow_is_the_max_over_a_disk(m, px):
    np.testing.assert_array_equal(masks.grow(m, px), brute_grow(m, px))


@fast
@given(mask_arrays(), st.integers(0, 5), st.integers(0, 5))
def test_grow_is_monotone(m, a, b):
    ga = masks.grow(m, a)
    assert (ga >= m).all()
    assert (masks.grow(m, a + b) >= ga).all()
    np.testing.assert_array_equal(masks.grow(m, 0), m)
    assert not masks.grow(np.zeros_like(m), a).any()


@fast
@given(mask_arrays(), st.integers(1, 4))
def test_negative_grow_shrinks(m, px):
    shrunk = masks.grow(m, -px)
    assert (shrunk <= m).all()
    np.testing.assert_array_equal(masks.grow(np.ones_like(m), -px), np.ones_like(m))  # borders do not erode


def test_grow_is_round_not_square():
    m = np.zeros((21, 21), np.float32)
    m[10, 10] = 1
    g = masks.grow(m, 6)
    assert g[10, 16] == 1 and g[16, 10] == 1  # reaches px straight out
    assert g[16, 16] == 0  # but not the square's corner (distance 8.5)


@fast
@given(mask_arrays(levels=(0.0, 0.2, 0.5, 0.8, 1.0)), st.integers(0, 5))
def test_feather_stays_inside_its_reach(m, px):
    f = masks.feather(m, px)
    assert f.dtype == np.float32 and f.shape == m.shape
    assert ((f >= 0) & (f <= 1)).all()
    assert (f >= m).all()
    assert not f[distance_to(m) > px].any()
    if px == 0:
        np.testing.assert_array_equal(f, m)


@fast
@given(binary_masks(), st.integers(1, 5))
def test_feather_of_a_binary_mask_is_a_smooth_ramp_of_the_distance(m, px):
    d = distance_to(m)
    t = np.clip(1 - d / (px + 1), 0, 1)
    expected = np.where(d <= px, t * t * (3 - 2 * t), 0)
    np.testing.assert_allclose(masks.feather(m, px), expected, atol=1e-6)


@fast
@given(mask_arrays(levels=(0.0, 0.2, 0.5, 0.8, 1.0)), st.integers(1, 4))
def test_feather_is_monotone_in_the_mask(m, px):
    more = np.maximum(m, np.roll(m, 1, axis=0))
    assert (masks.feather(more, px) >= masks.feather(m, px) - 1e-6).all()


def test_feather_ramp_falls_away_from_the_edge():
    m = np.zeros((5, 30), np.float32)
    m[:, :10] = 1
    row = masks.feather(m, 8)[2]
    assert (row[:10] == 1).all()
    assert (np.diff(row[9:19]) < 0).all()  # strictly falling through the 8-pixel band
    assert (row[19:] == 0).all()


def test_morphology_is_fast_on_a_photo_sized_mask():
    m = np.zeros((3000, 4000), np.float32)
    m[1000:1400, 1500:2100] = 1
    assert masks.feather(masks.grow(m, 16), 16)[1200, 1800] == 1


# --- latent grid, padding --------------------------------------------------------------------------------


@fast
@given(mask_arrays(shape=st.tuples(st.integers(1, 4), st.integers(1, 4)).map(lambda s: (s[0] * 8, s[1] * 8))))
def test_latent_mask_is_the_cell_max_and_covers_every_edited_pixel(m):
    lm = masks.latent_mask(m, 8)
    assert lm.shape == (m.shape[0] // 8, m.shape[1] // 8)
    ys, xs = np.nonzero(m > 0)
    assert (lm[ys // 8, xs // 8] > 0).all()
    for cy in range(lm.shape[0]):
        for cx in range(lm.shape[1]):
            assert lm[cy, cx] == m[cy * 8 : cy * 8 + 8, cx * 8 : cx * 8 + 8].max()


def test_latent_mask_needs_whole_cells():
    with pytest.raises(ValueError, match="multiple of 8"):
        masks.latent_mask(np.zeros((12, 16), np.float32), 8)


@fast
@given(st.integers(1, 40), st.integers(1, 40))
def test_pad_to_multiple_round_trips(h, w):
    rng = np.random.default_rng(h * 100 + w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    m = rng.random((h, w), dtype=np.float32)
    pi, pm, size = masks.pad_to_multiple(image, m, 16)
    assert pi.shape[0] % 16 == 0 and pi.shape[1] % 16 == 0 and pi.shape[:2] == pm.shape
    assert size == (w, h)
    assert not pm[h:].any() and not pm[:, w:].any()  # padding is "keep"
    np.testing.assert_array_equal(pi[h:, :w], np.broadcast_to(image[-1:], pi[h:, :w].shape))  # edge repeated
    np.testing.assert_array_equal(masks.crop(pi, size), image)
    np.testing.assert_array_equal(masks.crop(pm, size), m)


# --- composite -------------------------------------------------------------------------------------------


@fast
@given(mask_arrays(levels=(0.0, 1e-7, 0.3, 0.5, 0.9999999, 1.0)), st.integers(0, 2**32 - 1))
def test_composite_is_exact_where_the_mask_is_0_or_1(m, seed):
    rng = np.random.default_rng(seed)
    original = rng.integers(0, 256, m.shape + (3,), dtype=np.uint8)
    generated = rng.integers(0, 256, m.shape + (3,), dtype=np.uint8)
    out = masks.composite(original, generated, m)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[m == 0], original[m == 0])
    np.testing.assert_array_equal(out[m == 1], generated[m == 1])
    lo, hi = np.minimum(original, generated), np.maximum(original, generated)
    assert ((out >= lo) & (out <= hi)).all()


def test_composite_rounds_the_blend():
    ten, thirteen = np.full((1, 1, 3), 10, np.uint8), np.full((1, 1, 3), 13, np.uint8)
    out = masks.composite(ten, thirteen, np.full((1, 1), 0.5, np.float32))
    assert out[0, 0, 0] == 12  # 11.5 rounds to even


def test_empty_masks_are_refused():
    m = np.zeros((4, 4), np.float32)
    assert masks.selected_area(m) == 0
    with pytest.raises(UsageError, match="mask x.png selects nothing"):
        masks.ensure_not_empty(m, "mask x.png")
    m[1, 2] = 0.1
    assert masks.selected_area(m) == 1 and masks.ensure_not_empty(m, "m") is m


# --- rectangles ------------------------------------------------------------------------------------------


@fast
@given(st.integers(1, 200), st.integers(1, 200), st.data())
def test_pixel_rects_round_trip(width, height, data):
    x = data.draw(st.integers(0, width - 1))
    y = data.draw(st.integers(0, height - 1))
    w = data.draw(st.integers(1, width - x))
    h = data.draw(st.integers(1, height - y))
    assert masks.parse_rect(f"{x},{y},{w},{h}", width, height) == (x, y, x + w, y + h)
    assert masks.parse_rect(f" {x} , {y} ,{w}, {h} ", width, height) == (x, y, x + w, y + h)


@fast
@given(st.integers(1, 50).map(lambda k: k * 20), st.integers(1, 50).map(lambda k: k * 20), st.data())
def test_percent_rects_scale_with_the_image(width, height, data):
    px, py = (data.draw(st.integers(0, 19)) * 5 for _ in range(2))  # starts inside the image
    pw, ph = (data.draw(st.integers(1, 30)) * 5 for _ in range(2))  # sizes up to 150%: clipped
    box = masks.parse_rect(f"{px}%,{py}%,{pw}%,{ph}%", width, height)
    # multiples of 5% of multiples of 20 px are whole pixels, so the box is exact
    x0, y0 = width * px // 100, height * py // 100
    assert box == (x0, y0, min(width, x0 + width * pw // 100), min(height, y0 + height * ph // 100))


@fast
@given(st.integers(-300, 300), st.integers(-300, 300), st.integers(1, 400), st.integers(1, 400))
def test_rects_are_clipped_to_the_image(x, y, w, h):
    width, height = 120, 90
    try:
        x0, y0, x1, y1 = masks.parse_rect(f"{x},{y},{w},{h}", width, height)
    except UsageError as e:
        assert "lies outside the 120x90 image" in str(e)
        assert x + w <= 0 or y + h <= 0 or x >= width or y >= height
        return
    assert (x0, y0, x1, y1) == (max(x, 0), max(y, 0), min(x + w, width), min(y + h, height))


def test_fractional_rects_round_outwards():
    assert masks.parse_rect("12.5%,0,12.5%,100%", 100, 10) == (12, 0, 25, 10)
    assert masks.parse_rect("10%,10%,50%,50%", 120, 90) == (12, 9, 72, 54)  # exact, not 12.000000000000002
    assert masks.parse_rect("0.5,.5,1,1", 10, 10) == (0, 0, 2, 2)


@pytest.mark.parametrize(
    "text", ["a,b,c,d", "10%%,0,5,5", "1,2,3", "", "1,2,3,4,5", "1,,3,4", "1e2,0,5,5", "nan,0,5,5", "1, 2 3,4,5"]
)
def test_malformed_rects_are_refused(text):
    with pytest.raises(UsageError, match="expected X,Y,W,H") as e:
        masks.parse_rect(text, 100, 100)
    assert repr(text) in str(e.value)


@pytest.mark.parametrize("text", ["0,0,0,10", "0,0,10,-5", "0,0,0%,10%"])
def test_empty_rects_are_refused(text):
    with pytest.raises(UsageError, match="width and height must be positive"):
        masks.parse_rect(text, 100, 100)


@pytest.mark.parametrize("text", ["100,0,10,10", "0,100,10,10", "-20,0,20,10", "100%,0,10%,10%"])
def test_rects_outside_the_image_are_refused(text):
    with pytest.raises(UsageError, match=r"lies outside the 100x100 image"):
        masks.parse_rect(text, 100, 100)


@fast
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(0, 11), st.integers(1, 16), st.integers(1, 12)), max_size=4))
def test_rect_union_is_the_max_of_single_rect_masks(rects):
    boxes = [masks.parse_rect(",".join(map(str, r)), 16, 12) for r in rects]
    union = masks.rect_mask(boxes, 16, 12)
    expected = np.zeros((12, 16), np.float32)
    for b in boxes:
        expected = np.maximum(expected, masks.rect_mask([b], 16, 12))
    np.testing.assert_array_equal(union, expected)


# --- loading mask files ----------------------------------------------------------------------------------

GREY = np.array([[0, 64, 128, 255]], np.uint8)  # 4x1: keep, partial, partial, regenerate


def save(tmp_path, image, name="m.png", **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_load_greyscale(tmp_path):
    m = load_mask(save(tmp_path, Image.fromarray(GREY)), (4, 1))
    assert m.dtype == np.float32
    np.testing.assert_allclose(m, GREY / 255, atol=1e-7)


def test_load_rgb_uses_luminance(tmp_path):
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0]]], np.uint8)
    m = load_mask(save(tmp_path, Image.fromarray(rgb)), (4, 1))
    np.testing.assert_allclose(m, [[1, 0, 0.299, 0.587]], atol=1 / 255)


def test_load_rgba_with_transparency_uses_alpha(tmp_path):
    rgba = np.zeros((1, 4, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: luminance would say "regenerate all"
    rgba[..., 3] = [0, 128, 255, 255]
    m = load_mask(save(tmp_path, Image.fromarray(rgba)), (4, 1))
    np.testing.assert_allclose(m, [[1, 127 / 255, 0, 0]], atol=1e-6)


def test_load_opaque_rgba_uses_luminance(tmp_path):
    rgba = np.full((1, 4, 4), 255, np.uint8)
    rgba[0, :, :3] = GREY[0, :, None]
    m = load_mask(save(tmp_path, Image.fromarray(rgba)), (4, 1))
    np.testing.assert_allclose(m, GREY / 255, atol=1e-7)


def test_load_la_with_transparency_uses_alpha(tmp_path):
    la = np.stack([np.full((1, 4), 255, np.uint8), np.array([[255, 0, 255, 0]], np.uint8)], axis=-1)
    m = load_mask(save(tmp_path, Image.fromarray(la, "LA")), (4, 1))
    np.testing.assert_array_equal(m, [[0, 1, 0, 1]])


def test_load_palette_with_transparent_index(tmp_path):
    p = Image.fromarray(np.array([[0, 1, 1, 0]], np.uint8), "P")
    p.putpalette([0, 0, 0, 255, 255, 255])
    m = load_mask(save(tmp_path, p, transparency=1), (4, 1))
    np.testing.assert_array_equal(m, [[0, 1, 1, 0]])  # index 1 is transparent: regenerate


def test_load_palette_without_transparency_uses_luminance(tmp_path):
    p = Image.fromarray(np.array([[0, 1, 1, 0]], np.uint8), "P")
    p.putpalette([0, 0, 0, 255, 255, 255])
    np.testing.assert_array_equal(load_mask(save(tmp_path, p), (4, 1)), [[0, 1, 1, 0]])


def test_load_16_bit_greyscale(tmp_path):
    a = np.array([[0, 16384, 32768, 65535]], np.uint16)
    m = load_mask(save(tmp_path, Image.fromarray(a)), (4, 1))
    np.testing.assert_allclose(m, a / 65535, atol=1e-6)


def test_load_jpeg(tmp_path):
    a = np.zeros((16, 16), np.uint8)
    a[:, 8:] = 255
    m = load_mask(save(tmp_path, Image.fromarray(a), "m.jpg", quality=95), (16, 16))
    assert (m[:, :6] < 0.05).all() and (m[:, 10:] > 0.95).all()


def test_load_applies_exif_orientation(tmp_path):
    a = np.zeros((2, 4), np.uint8)
    a[0, 0] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display is 90 degrees clockwise, so 2x4 on disk is 4 tall on screen
    m = load_mask(save(tmp_path, img, "m.jpg", exif=exif, quality=100), (2, 4))
    assert m.shape == (4, 2) and m[0, 1] > 0.5


def test_size_mismatch_names_both_sizes(tmp_path):
    path = save(tmp_path, Image.new("L", (100, 80), 255))
    with pytest.raises(UsageError) as e:
        load_mask(path, (120, 90))
    assert str(e.value) == f"mask {path} is 100x80 but the image is 120x90; pass --mask-resize to scale it"
    m = load_mask(path, (120, 90), resize=True)
    assert m.shape == (90, 120) and (m == 1).all()


def test_unreadable_masks_name_the_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_mask(tmp_path / "missing.png", (4, 4))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UsageError, match=f"mask {text} is not an image"):
        load_mask(text, (4, 4))
    broken = save(tmp_path, Image.new("L", (64, 64)), "broken.png")
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(UsageError, match="broken.png"):
        load_mask(broken, (64, 64))


def test_alpha_mask_of_an_input_image():
    assert alpha_mask(Image.new("RGB", (3, 2))) is None
    assert alpha_mask(Image.new("RGBA", (3, 2), (1, 2, 3, 255))) is None
    rgba = np.full((2, 3, 4), 255, np.uint8)
    rgba[1, 2, 3] = 0
    m = alpha_mask(Image.fromarray(rgba))
    assert m.shape == (2, 3) and m[1, 2] == 1 and m.sum() == 1


# --- outpainting -----------------------------------------------------------------------------------------


@fast
@given(
    st.integers(1, 300), st.integers(1, 300), st.integers(0, 200), st.integers(0, 200),
    st.sampled_from(list(masks.ANCHORS)),
)
def test_to_margins_fill_the_target_at_the_anchor(w, h, extra_w, extra_h, anchor):
    if extra_w == extra_h == 0:
        return
    left, right, top, bottom = masks.outpaint_margins((w, h), to=(w + extra_w, h + extra_h), anchor=anchor)
    assert min(left, right, top, bottom) >= 0
    assert (left + right, top + bottom) == (extra_w, extra_h)
    for fraction, before, after in ((masks.ANCHORS[anchor][0], left, right), (masks.ANCHORS[anchor][1], top, bottom)):
        if fraction == 0:
            assert before == 0  # anchored: this edge stays where it was
        elif fraction == 1:
            assert after == 0
        else:
            assert after - before in (0, 1)  # centred, the odd pixel right/bottom


@pytest.mark.parametrize(
    "anchor, expected",
    [("center", (5, 5, 5, 5)), ("left", (0, 5, 5, 5)), ("top-right", (5, 0, 0, 5)), ("bottom", (5, 5, 5, 0))],
)
def test_expand_grows_away_from_the_anchor(anchor, expected):
    assert masks.outpaint_margins((40, 30), expand=5, anchor=anchor) == expected
    assert masks.outpaint_margins((40, 30), left=1, expand=5, anchor=anchor)[0] == expected[0] + 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(to=(30, 40)), "--to 30x40 is smaller than the 40x30 image"),
        (dict(to=(40, 30)), "nothing to outpaint"),
        (dict(), "nothing to outpaint"),
        (dict(to=(50, 50), left=2), "--to cannot be combined"),
        (dict(left=-1), "--left -1: must be 0 or more"),
        (dict(expand=4, anchor="middle"), "--anchor 'middle': expected one of center, left"),
    ],
)
def test_bad_outpaint_requests_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        masks.outpaint_margins((40, 30), **kwargs)


@fast
@given(
    st.integers(1, 12), st.integers(1, 12), st.tuples(*[st.integers(0, 6)] * 4).filter(any), st.integers(0, 4),
    st.integers(0, 2**32 - 1),
)
def test_outpaint_canvas_keeps_the_original_and_feathers_the_seam(h, w, margins, px, seed):
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    left, right, top, bottom = margins
    canvas, m = masks.outpaint_canvas(image, margins, px)
    assert canvas.shape == (h + top + bottom, w + left + right, 3) and canvas.dtype == np.uint8
    assert m.shape == canvas.shape[:2]
    np.testing.assert_array_equal(canvas[top : top + h, left : left + w], image)
    new = np.ones_like(m)
    new[top : top + h, left : left + w] = 0
    assert (m[new == 1] == 1).all()
    np.testing.assert_allclose(m, masks.feather(new, px), atol=1e-6)  # the seam band is exactly a feather


def test_outpaint_fill_is_not_flat_grey():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (200, 30, 30)  # red left half, blue right half
    image[:, 16:] = (30, 30, 200)
    canvas, _ = masks.outpaint_canvas(image, (32, 32, 0, 0), 4)
    assert canvas[16, 0, 0] > 150 and canvas[16, -1, 2] > 150  # each side continues its own colour


# --- large inputs ----------------------------------------------------------------------------------------


def test_crop_box_is_the_mask_plus_context_clipped():
    m = np.zeros((300, 400), np.float32)
    m[100:120, 10:50] = 1
    assert masks.crop_box(m, 16, max_pixels=400 * 300) == (0, 0, 400, 300)  # fits: whole image
    assert masks.crop_box(m, 16, max_pixels=10_000) == (0, 84, 66, 136)
    assert masks.crop_box(m, 200, max_pixels=10_000) == (0, 0, 400, 300)  # box is most of the image


def test_crop_box_refuses_an_empty_mask():
    with pytest.raises(UsageError, match="selects nothing"):
        masks.crop_box(np.zeros((300, 400), np.float32), 16, max_pixels=10_000)


@fast
@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([256 * 256, 512 * 512, 1024 * 1024]))
def test_work_size_fits_the_budget_and_keeps_the_aspect(bw, bh, max_pixels):
    w, h = masks.work_size(bw, bh, max_pixels)
    assert w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16
    assert w * h <= max_pixels
    if 16 <= min(bw, bh) and max(bw, bh) / min(bw, bh) < 8:
        assert abs(np.log((w / h) / (bw / bh))) < 0.35
    if bw * bh <= max_pixels and bw * bh >= 512 * 512 and bw % 16 == 0 and bh % 16 == 0:
        assert (w, h) == (bw, bh)  # fits: native size, no resampling


def test_work_size_examples():
    assert masks.work_size(4000, 3000, 1024 * 1024) == (1184, 880)
    assert masks.work_size(800, 608, 1024 * 1024) == (800, 608)
    assert masks.work_size(100, 100, 1024 * 1024) == (512, 512)
