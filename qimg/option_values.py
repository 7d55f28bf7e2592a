"""The values qimg's options take, each declared once: every fixed choice list as one tuple (the CLI's `Literal`
types are built from them, and the engine, weights and masks check or use the same tuple), the
defaults more than one layer states, the WIDTHxHEIGHT parser of --size, --to and prompts files' sizes, and the
largest image qimg works on (inputs, --size and an outpainted canvas are checked against it).

It imports nothing heavy (no torch, numpy or PIL): the CLI reads it while `qimg --help` stays instant."""

from qimg.errors import UsageError

# --- Choices -------------------------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")  # --dtype, besides auto (bfloat16 on GPUs, float32 on CPU)
OFFLOAD = ("none", "model", "blocks")
ATTENTION = ("auto", "math", "flash", "efficient", "cudnn")  # auto: let PyTorch's SDPA pick
TILING = ("auto", "on", "off")  # --vae-tiling
QUANTIZE = ("none", "fp8")
ATTN_MASK = ("on", "off")
METADATA = ("full", "minimal", "off")  # --metadata: what a PNG output records (jobs/metadata.py)
# --anchor: where the original sits on outpaint's grown canvas (masks.anchor_fractions places each)
ANCHORS = ("center", "left", "right", "top", "bottom", "top-left", "top-right", "bottom-left", "bottom-right")
SAFETY = ("off", "prompt", "image", "both")  # --safety, $QIMG_SAFETY: what the safety filter checks (jobs/safety.py)
SAFETY_ACTIONS = ("refuse", "blur", "black")  # --safety-action: what an image the filter flags becomes

# --- Defaults ------------------------------------------------------------------------------------------------

CACHE_SIZE = "2GB"  # --cache-size: the cache's cap
MASK_THRESHOLD = 0.4  # --mask-threshold: a pixel is in a phrase's region from this probability up
RAY_RETRIES = 2  # --retries: runs of a file whose Ray actor failed or was lost, on another
SAFETY_THRESHOLD = 0.5  # --safety-threshold: a score at or over it is a hit
CONTEXT = 64  # --context: pixels around the mask an inpaint on a large image shows the model


def parse_size(text: str, option: str = "--size", multiple: int = 16) -> tuple[int, int]:
    """`WIDTHxHEIGHT` as (width, height), each a positive multiple of `multiple`; a UsageError names `option`."""
    parts = text.lower().split("x")
    if any(len(v.strip()) > MAX_DIGITS for v in parts):
        raise UsageError(f"{option} {text[:37]!r}...: a value has over {MAX_DIGITS} digits; not WIDTHxHEIGHT, "
                         "e.g. 1024x768")
    try:
        w, h = (int(v) for v in parts)
    except ValueError:
        raise UsageError(f"{option} {text[:40]!r} is not WIDTHxHEIGHT, e.g. 1024x768") from None
    for name, v in (("width", w), ("height", h)):
        if v <= 0 or v % multiple:
            raise UsageError(f"{option} {text}: {name} {v} must be a positive multiple of {multiple}")
    return w, h


# --- Limits --------------------------------------------------------------------------------------------------

# The most digits a number written in an option may have (--size, --to, --rect, --cache-size, a --lora scale):
# far past any real value; Python refuses ints over 4300 digits, and huge ones are slow anyway.
MAX_DIGITS = 30

# Inputs larger than this are refused from their header, before a byte is decoded (a decompression bomb
# is a small file claiming a huge size). 128 MP covers 100 MP medium-format photos; the masks and the
# compositing of such an image take ~50 bytes a pixel.
MAX_INPUT_PIXELS = 128_000_000


def check_pixels(size: tuple[int, int], what: str, fix: str = "downscale it first") -> None:
    """Refuse an image (or a canvas about to be made) over MAX_INPUT_PIXELS, naming its size."""
    width, height = size
    if width * height > MAX_INPUT_PIXELS:
        raise UsageError(f"{what} is {width}x{height} = {width * height / 1e6:,.0f} megapixels; qimg works on "
                         f"images up to {MAX_INPUT_PIXELS / 1e6:.0f} megapixels ({fix})")


def preset_is_file(name: str) -> bool:
    """Whether a --preset value names a file (a path, or a .yaml/.yml name) rather than a bundled preset."""
    return "/" in name or "\\" in name or name.endswith((".yaml", ".yml"))
