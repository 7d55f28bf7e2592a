"""The options the `qimg` commands share, declared once as `Annotated` aliases: their types, ranges, help
panels and help text, and the callbacks that check a value as it is parsed. cli.py declares the commands
with them."""

import re
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from qimg.cli import presets
from qimg.errors import UsageError
from qimg.option_values import (
    ANCHORS,
    ATTENTION,
    ATTN_MASK,
    DTYPES,
    METADATA,
    OFFLOAD,
    QUANTIZE,
    SAFETY,
    SAFETY_ACTIONS,
    TILING,
    parse_size,
)

PROMPT, MASK, SAMPLING, MODEL, OUTPUT, CACHE, SPEED, SCALE = (
    "Prompt", "Mask", "Sampling", "Model and device", "Output", "Cache", "Speed", "Many GPUs, many machines")


def utf8_text(value: Optional[str]) -> Optional[str]:
    """Refuse text that is not UTF-8 (on POSIX, undecodable argv bytes arrive as surrogates)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise typer.BadParameter(f"byte {e.object[e.start].encode('utf-8', 'surrogateescape')!r} at character "
                                     f"{e.start} is not UTF-8; pass text in UTF-8") from None
    return value


def utf8_texts(values: Optional[list[str]]) -> Optional[list[str]]:
    """utf8_text for each value of a repeatable option."""
    return [utf8_text(v) for v in values] if values else values


def open_unit(value: float) -> float:
    """A probability strictly between 0 and 1 (typer here has no min_open/max_open)."""
    if not 0 < value < 1:
        raise typer.BadParameter(f"{value:g} is not between 0 and 1 (both excluded)")
    return value


def device_name(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


def devices_value(value: Optional[str]) -> Optional[str]:
    """--devices: a comma list of cpu, mps, cuda or cuda:N (a device may repeat)."""
    if value is not None:
        for name in value.split(","):
            if not re.fullmatch(r"cpu|mps|cuda(:\d{1,3})?", name.strip()):
                raise typer.BadParameter(f"{name.strip()!r} is not a device (cpu, cuda, cuda:N, mps); give them "
                                         "separated by commas, e.g. cuda:0,cuda:1")
    return value


def split_value(value: Optional[str]) -> Optional[str]:
    """--split: whole numbers separated by commas, one per --devices entry."""
    if value is not None and not re.fullmatch(r"\s*\d{1,4}\s*(,\s*\d{1,4}\s*)*", value):
        raise typer.BadParameter(f"{value!r} is not block counts separated by commas, e.g. 30,30")
    return value


def size_value(value: Optional[str]) -> Optional[tuple[int, int]]:
    """--size as (width, height), multiples of 16, parsed as the job is built; a UsageError names --size."""
    return parse_size(value) if value is not None else None


def any_size(value: Optional[str]) -> Optional[tuple[int, int]]:
    """edit's --size as (width, height), any positive sides."""
    return parse_size(value, multiple=1) if value is not None else None


def to_size(value: Optional[str]) -> Optional[tuple[int, int]]:
    """outpaint's --to as (width, height): a malformed one is one usage line before any file is read."""
    return parse_size(value, "--to", multiple=1) if value is not None else None


PromptOpt = Annotated[str, typer.Option("--prompt", "-p", callback=utf8_text, rich_help_panel=PROMPT,
                                        help="What to draw (any language).")]
NegativeOpt = Annotated[Optional[str], typer.Option(callback=utf8_text, rich_help_panel=PROMPT,
                                                    show_default="the model's, ' '", help="What to steer away from.")]
SizeOpt = Annotated[Optional[str], typer.Option(callback=size_value, rich_help_panel=SAMPLING,
                                                show_default="the model's", help="WIDTHxHEIGHT, multiples of 16.")]
StepsOpt = Annotated[Optional[int], typer.Option(min=1, max=1000, rich_help_panel=SAMPLING,
                                                 show_default="the model's, 50", help="Sampling steps.")]
CfgOpt = Annotated[Optional[float], typer.Option(min=0.0, max=100.0, rich_help_panel=SAMPLING,
                                                 help="True CFG scale; 1 or less turns guidance off.")]
SeedOpt = Annotated[Optional[int], typer.Option(min=0, max=2**63 - 1, rich_help_panel=SAMPLING,
                                                show_default="random, reported", help="Random seed.")]
StrengthOpt = Annotated[float, typer.Option(min=0.0, max=1.0, rich_help_panel=SAMPLING,
                                            help="How far to re-noise the masked area; 1 = from scratch.")]
AttnMaskOpt = Annotated[Literal[ATTN_MASK], typer.Option(
    rich_help_panel=SAMPLING, help="on: kept pixels never attend to the edited area or the text; off: they do.")]
PIXELS = 2**31 - 1  # the largest pixel count an option takes: far past any image; huge numbers never reach the math
ContextOpt = Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=SAMPLING,
                                         help="Pixels around the mask the model sees on large images.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="QIMG_MODEL", show_envvar=True, rich_help_panel=MODEL,
    show_default="builtin", help="Model folder (diffusers layout), Hugging Face repo id (Qwen/Qwen-Image), or "
                                 "builtin: the small shapes model.")]
DeviceOpt = Annotated[str, typer.Option(callback=device_name, rich_help_panel=MODEL,
                                        help="Where to run: auto, cpu, cuda, cuda:N or mps.")]
DevicesOpt = Annotated[Optional[str], typer.Option(
    callback=devices_value, rich_help_panel=SCALE, show_default="one device, --device",
    help="Split the transformer's blocks over these devices in this process (cuda:0,cuda:1; a device may repeat), "
         "sized by their free memory; prints the placement.")]
SplitOpt = Annotated[Optional[str], typer.Option(
    callback=split_value, rich_help_panel=SCALE, show_default="by free memory",
    help="With --devices: the transformer blocks each device takes, e.g. 30,30.")]
DtypeOpt = Annotated[Literal[("auto", *DTYPES)], typer.Option(
    rich_help_panel=MODEL, help="Number format; auto: bfloat16 on GPUs, float32 on CPU.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", rich_help_panel=OUTPUT,
                                                help="Output image (.png, .jpg, .webp).")]
OverwriteOpt = Annotated[bool, typer.Option(
    rich_help_panel=OUTPUT, help="Replace existing outputs (--out, the input image included, or the default "
                                 "names), atomically; without it qimg never replaces a file.")]
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT,
                                       help="Print one JSON object per result on stdout.")]
MetadataOpt = Annotated[Literal[METADATA], typer.Option(
    rich_help_panel=OUTPUT, help="What a PNG output records of how it was made: full (files by name and sha256, the "
                                 "model by repo id or folder name, never a folder's path), minimal (only what "
                                 "reproduces the image), off (nothing).")]
OutDirOpt = Annotated[Optional[Path], typer.Option(rich_help_panel=OUTPUT,
                                                   help="Folder for the outputs, named <stem>.<command>.png.")]
SkipExistingOpt = Annotated[bool, typer.Option(rich_help_panel=OUTPUT,
                                               help="Skip inputs whose <stem>.<command>.png exists (resume).")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(
    rich_help_panel=CACHE, show_default="$QIMG_CACHE_DIR, else the user cache folder",
    help="Latent and prompt cache folder.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", rich_help_panel=CACHE,
                                          help="Neither read nor write the cache.")]
CacheSizeOpt = Annotated[str, typer.Option(envvar="QIMG_CACHE_SIZE", show_envvar=True, rich_help_panel=CACHE,
                                           help="Cache size cap; least recently used entries go first; 0: no cache.")]
OffloadOpt = Annotated[Literal[OFFLOAD], typer.Option(
    rich_help_panel=SPEED, help="none; model: load text encoder, transformer and VAE one at a time; blocks: "
                                "stream the transformer's blocks from CPU memory.")]
CompileOpt = Annotated[bool, typer.Option("--compile", rich_help_panel=SPEED,
                                          help="torch.compile the transformer blocks (slow first step).")]
AttentionOpt = Annotated[Literal[ATTENTION], typer.Option(
    rich_help_panel=SPEED, help="Attention kernel; auto: PyTorch picks.")]
TilingOpt = Annotated[Literal[TILING], typer.Option(
    rich_help_panel=SPEED, help="Decode the VAE in tiles; auto: images over 4 megapixels.")]
PresetOpt = Annotated[Optional[str], typer.Option(
    is_eager=True, callback=presets.apply, rich_help_panel=SAMPLING,
    help="Options from a preset: a bundled name (see `qimg presets`) or a YAML file; flags given here win.")]
ImagesArg = Annotated[list[Path], typer.Argument(
    help="Input image(s): files, folders (their images, not qimg outputs) or quoted globs.", show_default=False)]
ReuseOpt = Annotated[Optional[float], typer.Option(
    min=0.0, max=1.0, rich_help_panel=SPEED, show_default="0: off",
    help="Reuse the last velocity while the model's output is estimated to change less than this (0.05-0.2 "
         "trade a little fidelity for 25-55% fewer transformer calls).")]
CfgUntilOpt = Annotated[Optional[float], typer.Option(
    min=0.0, max=1.0, rich_help_panel=SPEED, show_default="1: every step",
    help="True CFG only for this first fraction of the steps, the conditional pass alone after.")]
PreviewOpt = Annotated[Optional[Path], typer.Option(
    rich_help_panel=OUTPUT, help="Write the current estimate of the image to this file as it renders, replaced "
                                 "atomically, the last time by the result; for a batch, a folder (one file each).")]
PreviewEveryOpt = Annotated[Optional[int], typer.Option(
    min=1, max=1000, rich_help_panel=OUTPUT, show_default="about a tenth of the steps",
    help="Steps between --preview writes.")]
LoraOpt = Annotated[Optional[list[str]], typer.Option(
    "--lora", rich_help_panel=MODEL, show_default=False,
    help="A LoRA (or LoKr, LoHa) .safetensors file, FILE or FILE:SCALE (scale 1 by default); repeatable, they "
         "add up.")]
ShiftOpt = Annotated[Optional[float], typer.Option(
    min=0.001, max=1000.0, rich_help_panel=SAMPLING, show_default="the model's schedule",
    help="A constant flow shift instead of the model's schedule: 3 for the Lightning LoRAs.")]
TransformerOpt = Annotated[Optional[Path], typer.Option(
    envvar="QIMG_TRANSFORMER", show_envvar=True, rich_help_panel=MODEL, show_default="the model folder's",
    help="The transformer's weights from one file: .gguf (Q8_0, Q4_K_M, ...) or .safetensors (bf16, fp8, ComfyUI "
         "scaled fp8); everything else comes from --model.")]
TextEncoderOpt = Annotated[Optional[Path], typer.Option(
    envvar="QIMG_TEXT_ENCODER", show_envvar=True, rich_help_panel=MODEL, show_default="the model folder's",
    help="The text encoder from one file: ComfyUI's .safetensors (bf16, fp8 scaled) or a llama.cpp .gguf of "
         "Qwen2.5-VL-7B-Instruct; with --transformer and --vae, no --model is needed.")]
VaeOpt = Annotated[Optional[Path], typer.Option(
    envvar="QIMG_VAE", show_envvar=True, rich_help_panel=MODEL, show_default="the model folder's",
    help="The VAE from one .safetensors file (ComfyUI's qwen_image_vae.safetensors, or diffusers' names).")]
VisionOpt = Annotated[Optional[Path], typer.Option(
    envvar="QIMG_VISION", show_envvar=True, rich_help_panel=MODEL, show_default="the text encoder file's",
    help="Edit models with a GGUF --text-encoder: the vision tower from Qwen2.5-VL's mmproj .gguf file.")]
DequantizeOpt = Annotated[Optional[bool], typer.Option(
    "--dequantize/--no-dequantize", rich_help_panel=MODEL, show_default="on the CPU only",
    help="Unpack GGUF/fp8 weights once at load (full size) instead of on every step (they stay small).")]
QuantizeOpt = Annotated[Literal[QUANTIZE], typer.Option(
    rich_help_panel=MODEL,
    help="fp8: keep the transformer's block weights as scaled fp8, about half of bf16's memory.")]
NoWorkerOpt = Annotated[bool, typer.Option(
    "--no-worker", rich_help_panel=MODEL, help="Run in this process even when a worker runs (also QIMG_WORKER=0).")]
FeatherOpt = Annotated[int, typer.Option(min=0, max=PIXELS, rich_help_panel=MASK,
                                         help="Soft edge width in pixels outside the mask.")]
ShardOpt = Annotated[Optional[str], typer.Option(
    rich_help_panel=SCALE, show_default="all", help="I/N: only the batch's inputs whose name hashes to shard I of N "
    "(from 0); auto: from RANK/WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT.")]
RayOpt = Annotated[Optional[str], typer.Option(
    rich_help_panel=SCALE, metavar="ADDRESS", help="Spread the batch over Ray actors (pip install 'qimg\\[ray]'): "
    "local (a cluster started for the run), auto ($RAY_ADDRESS or the running one) or the cluster's address.")]
RayWorkersOpt = Annotated[Optional[int], typer.Option(
    min=1, max=100_000, rich_help_panel=SCALE, show_default="one per GPU of the cluster",
    help="With --ray: this many actors, one CPU each.")]
RetriesOpt = Annotated[int, typer.Option(
    min=0, max=100, rich_help_panel=SCALE,
    help="With --ray: run a file whose actor failed or was lost again on another, this many times.")]
MaskPromptOpt = Annotated[Optional[list[str]], typer.Option(
    callback=utf8_texts, rich_help_panel=MASK, show_default=False,
    help="Mask what these words name (the sky, the sofa); repeatable (union). Needs pip install 'qimg\\[masks]'.")]
MaskModelOpt = Annotated[Optional[str], typer.Option(
    envvar="QIMG_MASK_MODEL", show_envvar=True, rich_help_panel=MASK, show_default="clipseg",
    help="Segmentation model for words: clipseg, grounded-sam (crisp object edges), a folder or repo id.")]
MaskThresholdOpt = Annotated[float, typer.Option(
    callback=open_unit, metavar="FLOAT (0<x<1)", rich_help_panel=MASK,
    help="A pixel is in the words' region from this probability up.")]
SaveMaskOpt = Annotated[Optional[Path], typer.Option(
    rich_help_panel=MASK, help="Write the mask used to this file, or <stem>_mask.png in this folder (a batch).")]
CfgParallelOpt = Annotated[bool, typer.Option(
    "--cfg-parallel", rich_help_panel=SCALE, help="Under torchrun: the two branches of true CFG on two ranks, "
    "velocities swapped each step (docs/parallel.md).")]
UlyssesOpt = Annotated[int, typer.Option(
    min=1, max=64, rich_help_panel=SCALE, help="Under torchrun: the image's tokens split over N ranks, heads "
    "exchanged for attention; N divides the head count (24 for Qwen-Image).")]
TpOpt = Annotated[int, typer.Option(
    "--tp", min=1, max=64, rich_help_panel=SCALE, help="Under torchrun: each layer's weights split over N ranks "
    "(tensor parallel), each reading only its slices.")]
Anchor = Literal[ANCHORS]

# The safety filter (docs/safety.md); cli/to_job.safety_of applies the operator's $QIMG_SAFETY rules to them.
SAFE = "Safety filter (docs/safety.md)"
SAFETY_PARAMS = ("safety", "safety_words", "safety_prompt_classifier", "safety_classifier", "safety_threshold",
                 "safety_action")  # set for a whole run: never by a chain file's edit
SafetyOpt = Annotated[Optional[Literal[SAFETY]], typer.Option(
    rich_help_panel=SAFE, show_default="$QIMG_SAFETY, else off",
    help="A best-effort filter, not a guarantee: prompt: refuse prompts a word list or classifier flags, before "
         "any model loads; image: check every output and preview before it is written; both.")]
SafetyWordsOpt = Annotated[Optional[Path], typer.Option(
    rich_help_panel=SAFE, show_default="none (and $QIMG_SAFETY_WORDS, which applies too)",
    help="A word list: one word or phrase a line, # comments, any language; matched ignoring case, width and "
         "spacing.")]
SafetyPromptClassifierOpt = Annotated[Optional[str], typer.Option(
    envvar="QIMG_SAFETY_PROMPT_CLASSIFIER", show_envvar=True, rich_help_panel=SAFE, metavar="MODULE:CALLABLE",
    help="A function of the prompt's text returning a score in [0, 1].")]
SafetyClassifierOpt = Annotated[Optional[str], typer.Option(
    envvar="QIMG_SAFETY_CLASSIFIER", show_envvar=True, rich_help_panel=SAFE, metavar="MODULE:CALLABLE|FILE.onnx",
    show_default="open_nsfw, from pip install 'qimg\\[safety]'",
    help="The image classifier: a function of a PIL image returning a score in [0, 1], or an open_nsfw-style ONNX "
         "file.")]
SafetyThresholdOpt = Annotated[float, typer.Option(
    min=0.0, max=1.0, envvar="QIMG_SAFETY_THRESHOLD", show_envvar=True, rich_help_panel=SAFE,
    help="A score at or over this is a hit.")]
SafetyActionOpt = Annotated[Literal[SAFETY_ACTIONS], typer.Option(
    envvar="QIMG_SAFETY_ACTION", show_envvar=True, rich_help_panel=SAFE,
    help="What a flagged image becomes: refuse (nothing written, exit 3), blur or black (written so).")]

NoKvCacheOpt = Annotated[bool, typer.Option(
    "--no-kv-cache", rich_help_panel=SPEED,
    help="Qwen-Image-2.1: recompute the prompt's and pictures' keys and values at every step instead of once (the "
         "reference's other setting; the same image in float32, slower).")]


def color(value: Optional[str]) -> Optional[tuple[int, int, int]]:
    """--background: a colour name (white), #RRGGBB or R,G,B -> (R, G, B)."""
    if value is None:
        return None
    from PIL import ImageColor

    parts = value.split(",")
    try:
        if len(parts) == 3:
            rgb = tuple(int(p) for p in parts)
            if not all(0 <= v <= 255 for v in rgb):
                raise ValueError
            return rgb
        return ImageColor.getrgb(value.strip())[:3]
    except ValueError:
        raise UsageError(f"--background {value[:40]!r} is not a colour: give a name (white), #RRGGBB or "
                         "R,G,B") from None


BackgroundOpt = Annotated[Optional[str], typer.Option(
    callback=color, rich_help_panel=OUTPUT, show_default="keep the transparency",
    help="Flatten a transparent (RGBA) result over this colour: a name, #RRGGBB or R,G,B; needed for JPEG.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", rich_help_panel=OUTPUT, help="No licence notice (also QIMG_NO_NOTICE=1).")]
