"""Instruction editing (`qimg edit`) with the Qwen-Image-Edit models: the picture being edited, and on 2509/2511
up to two more, shown to the model twice, as the reference pipelines (diffusers' QwenImageEdit(Plus)Pipeline)
show them: to the vision tower inside the text encoder, and as clean latent tokens after the noisy ones.

Sizes are the reference's. Every picture is resized (LANCZOS) to about `edit_area` pixels at its own aspect,
sides rounded to 32, for the VAE; the vision tower sees the same image on Qwen-Image-Edit, and a resize to
about `vision_area` on 2509/2511. The noisy image has the edited picture's working size, so a masked edit
starts from, and keeps outside its mask, that picture's own latent (the reference's edit-inpaint blend).

On purpose unlike the reference: the result is resampled back to the input's size (the reference returns
its working size), and a masked edit is composited over the input, so pixels outside the mask are the
input's bytes. In a chain the latent is carried between instruction edits on the same working grid
(canvas.py), so the chain never encodes its own output.
"""

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from qimg.engine.canvas import Canvas, resample
from qimg.engine.components import Defaults
from qimg.engine.engine import EditResult, Engine
from qimg.engine.latents import Condition
from qimg.engine.preview import mapped
from qimg.engine.request import Sampling
from qimg.errors import QimgWarning, UsageError
from qimg.masks import crop_box, latent_mask, resize_mask
from qimg.model.transformer import TransformerConfig, patchify
from qimg.model.vl_image import smart_resize
from qimg.weights.folders import ModelKind, builtin_model, model_kind, read_config
from qimg.weights.text_encoder import image_config

MAX_PICTURES = 3  # what 2509/2511 were trained with ("Picture 1..3"); more run, with a warning
MAX_ASPECT = 200  # the vision tower's processor refuses pictures more elongated than this


class Areas(NamedTuple):
    edit: int  # pixels of a picture resized for the VAE (and the noisy image)
    vision: int  # pixels of a picture resized for 2509/2511's vision tower


class Pictures(NamedTuple):
    """What an instruction edit shows the model besides the picture it edits: the reference pictures (Pictures
    2, 3...) and the areas every picture is resized to."""

    refs: list[np.ndarray]  # (H, W, 3) uint8 each
    areas: Areas


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(W, H) of about `area` pixels at aspect `ratio` = W / H, sides rounded to multiples of 32 (the reference
    pipelines' calculate_dimensions; at least 32, where the reference would give an empty image)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return max(32, round(width / 32) * 32), max(32, round(height / 32) * 32)


def aspect(size: tuple[int, int]) -> float:
    return size[0] / size[1]


def check_model(folder, command: str = "edit") -> ModelKind:
    """The Edit model kind of `folder`, or a UsageError: a Qwen-Image (generation) model, or a transformer
    config qimg cannot run (Qwen-Image-Layered's flags), before anything loads."""
    kind = model_kind(folder)
    if not kind.edits:
        if folder == builtin_model():
            raise UsageError(f"`qimg {command}` needs a Qwen-Image-Edit model folder; the built-in model only "
                             "generates: pass --model /path/to/Qwen-Image-Edit-2511 (or set QIMG_MODEL)")
        raise UsageError(f"{folder} is a Qwen-Image model; `qimg {command}` needs a Qwen-Image-Edit model "
                         "(Qwen-Image-Edit, -2509 or -2511): pass its folder with --model")
    try:
        TransformerConfig.from_dict(read_config(folder / "transformer"))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{folder / 'transformer' / 'config.json'}: {e}") from None
    return kind


def check_pictures(kind: ModelKind, sizes: list[tuple[int, int]], names: list[str]) -> None:
    """Refuse, before anything loads, pictures the model cannot take: more than one on Qwen-Image-Edit, or one
    too elongated for the vision tower. Warn above three on 2509/2511."""
    if not kind.plus and len(sizes) > 1:
        raise UsageError(f"--ref: {kind.display} takes one picture; reference pictures need "
                         "Qwen-Image-Edit-2509 or -2511")
    check_aspect(sizes, names)
    if len(sizes) > MAX_PICTURES:
        warnings.warn(f"{len(sizes)} pictures: {kind.display} was trained with up to {MAX_PICTURES}",
                      QimgWarning, stacklevel=2)


def check_aspect(sizes: list[tuple[int, int]], names: list[str]) -> None:
    """Refuse, before anything loads, a picture ((W, H), named as `names` says) too elongated for the vision
    tower."""
    for (w, h), name in zip(sizes, names):
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise UsageError(f"{name} is {w}x{h}: over {MAX_ASPECT}:1, more elongated than the vision encoder "
                             "takes; crop it first")


def pick_areas(folder: Path, given: tuple[int | None, int | None], names: tuple[str, str]) -> Areas:
    """The areas an edit runs at: each as given, else the model's (its qimg.json's, else the reference's). One
    over the processor's max_pixels is refused before anything loads, naming where it came from (`names`: the
    option or key of each given value): the processor shrinks a larger picture to max_pixels anyway, so a larger
    area buys nothing but memory (tens of GB for a 2**31 one). The reference's own areas are never refused."""
    most, defaults = image_config(folder).max_pixels, Defaults.from_folder(folder)
    areas = []
    for field, value, name in zip(Areas._fields, given, names):
        key = f"{field}_area"
        if value is None:
            value, name = getattr(defaults, key), f"{folder / 'qimg.json'}: {key}"
        if value > most and value != getattr(Defaults, key):
            raise UsageError(f"{name} {value} is over {most}, the most pixels this model's processor takes "
                             f"(max_pixels in {folder / 'processor' / 'preprocessor_config.json'}); give at most "
                             f"{most}")
        areas.append(value)
    return Areas(*areas)


def vision_sizes(kind: ModelKind, sizes: list[tuple[int, int]], areas: Areas) -> list[tuple[int, int]]:
    """(W, H) the vision tower is given of pictures of `sizes`: on Qwen-Image-Edit the VAE's resize, on
    2509/2511 one to about the vision area (the processor then fits it to its 28-pixel patches)."""
    area = areas.vision if kind.plus else areas.edit
    return [calculate_dimensions(area, aspect(size)) for size in sizes]


def vision_pictures(kind: ModelKind, images: list[np.ndarray], areas: Areas) -> tuple[np.ndarray, ...]:
    """The pictures resized for the vision tower (vision_sizes)."""
    sizes = vision_sizes(kind, [image.shape[1::-1] for image in images], areas)
    return tuple(resample(image, size) for image, size in zip(images, sizes))


def check_fits(engine: Engine, work: tuple[int, int], sizes: list[tuple[int, int]], areas: Areas) -> None:
    """Refuse, before any weights load, an edit the device could not hold (engine.check_edit): the noisy image of
    `work` (W, H), every picture (of `sizes`, the edited one first) as latent tokens at the edit area and as the
    vision tower's patches at the vision area."""
    cfg = image_config(engine.folder)
    cut = [smart_resize(h, w, cfg) for w, h in vision_sizes(engine.kind, sizes, areas)]
    engine.check_edit(work, [calculate_dimensions(areas.edit, aspect(size)) for size in sizes],
                      sum(h * w for h, w in cut) // cfg.patch_size ** 2)


class References(NamedTuple):
    tokens: torch.Tensor  # (1, R, 64) the pictures' packed latents, in order
    grids: tuple[tuple[int, int], ...]  # each picture's (h, w) in transformer patches
    first: torch.Tensor  # (1, 16, h, w) Picture 1's latent
    encoded: bool  # whether the VAE encoder ran (else every latent was carried or cached)


def references(engine: Engine, images: list[np.ndarray], areas: Areas, first: torch.Tensor | None = None) -> References:
    """The pictures' latents, each resized to its working size: `first` (Picture 1's, carried by a chain) when
    given, the others from the cache or the VAE encoder."""
    latents, encoded = [], False
    for i, image in enumerate(images):
        if i == 0 and first is not None:
            latents.append(first)
            continue
        work = resample(image, calculate_dimensions(areas.edit, aspect(image.shape[1::-1])))
        latent, cache = engine.input_latent(work, work, whole=True)
        latents.append(latent)
        encoded |= cache != "hit"
    tokens = torch.cat([patchify(z.float()) for z in latents], dim=1)
    grids = tuple((z.shape[-2] // 2, z.shape[-1] // 2) for z in latents)
    return References(tokens, grids, latents[0], encoded)


def settle(engine: Engine, canvas: Canvas, work: tuple[int, int]) -> Canvas:
    """The canvas with its latent on the `work` grid, or with none: a latent on another grid (an inpaint's
    window, another working size) is decoded into the canvas's pixels first."""
    if canvas.latent is None or canvas.work == work:
        return canvas
    return Canvas.start(engine.render(canvas))


def edited(canvas: Canvas, mask: np.ndarray | None, latent: torch.Tensor, work: tuple[int, int]) -> Canvas:
    """The settled canvas after an instruction edit inside `mask` (None: everywhere) that made `latent`."""
    mask = np.ones(canvas.pixels.shape[:2], np.float32) if mask is None else mask
    return replace(canvas, pending=1 - (1 - canvas.pending) * (1 - mask), latent=latent, origin=(0, 0), work=work)


def working_size(canvas_size: tuple[int, int], areas: Areas) -> tuple[int, int]:
    return calculate_dimensions(areas.edit, aspect(canvas_size))


@torch.no_grad()
def edit_canvas(engine: Engine, canvas: Canvas, mask: np.ndarray | None, pictures: Pictures, sampling: Sampling,
                callback=None, work: tuple[int, int] | None = None, preview=None) -> tuple[Canvas, bool]:
    """One instruction edit of a canvas (the picture being edited) with the reference pictures of `pictures`,
    inside mask (H, W) in [0, 1] or, with None, everywhere; returns the canvas after it and whether the VAE
    encoder ran. work: the noisy image's (W, H), by default the canvas's working size; another needs mask None
    and strength 1 (the edit then starts from noise alone). `preview` (preview.Preview) sees each step's
    estimate of the canvas after the edit."""
    areas = pictures.areas
    own = working_size(canvas.size, areas)
    work = work or own
    check_fits(engine, work, [canvas.size, *(ref.shape[1::-1] for ref in pictures.refs)], areas)
    canvas = settle(engine, canvas, own)
    images = [engine.render(canvas), *pictures.refs]
    # The instruction first: a model folder without its processor or vision weights fails before any encoding.
    vision = vision_pictures(engine.kind, images, areas)
    embeds = engine.encode_prompts(sampling.prompts, vision)
    known = references(engine, images, areas, canvas.latent)
    w, h = work
    if mask is None:  # from noise alone: x0 is never used (sigma 1, a mask of ones), so any latent does
        z0, cells = torch.zeros(1, known.first.shape[1], h // 8, w // 8), torch.ones(h // 8, w // 8)
    else:
        z0, cells = known.first, torch.from_numpy(latent_mask(resize_mask(mask, work), 8))
    latent = engine.sample_known(z0, cells, Condition(embeds, known.tokens, known.grids), sampling, False, callback,
                                 mapped(preview, lambda z: edited(canvas, mask, z, work)))
    return edited(canvas, mask, latent, work), known.encoded


def instruct(engine: Engine, image: np.ndarray, mask: np.ndarray | None, pictures: Pictures, sampling: Sampling,
             size: tuple[int, int] | None = None, callback=None, preview=None) -> EditResult:
    """`qimg edit` of one image (H, W, 3) uint8: the result at the input's size, or `size` (W, H) (no mask),
    resampled from the working size (reported as work_size). With a mask, pixels where it is 0 are the input's
    bytes. The latent stands for the output only when the output is its decode as is (no mask, the output at the
    working size): then an edit of the output finds it in the cache and never encodes it.
    `preview` (preview.Preview) sees each step's estimate of the result."""
    encoded_before = engine.prompts_encoded
    height, width = image.shape[:2]
    work = working_size(size or (width, height), pictures.areas)

    def image_of(canvas: Canvas) -> np.ndarray:
        return engine.render(canvas) if size is None else resample(engine.decode(canvas.latent), size)

    canvas, encoded = edit_canvas(engine, Canvas.start(image), mask, pictures, sampling, callback, work,
                                  mapped(preview, image_of))
    result = image_of(canvas)
    latent_cache = "off" if engine.cache is None else "miss" if encoded else "hit"
    latent = canvas.latent if mask is None and result.shape[1::-1] == work else None
    return EditResult(result, latent, latent_cache, engine._prompt_cache(encoded_before), (0, 0, width, height), work)


def instruct_cropped(engine: Engine, image: np.ndarray, mask: np.ndarray, mask_crop: int, pictures: Pictures,
                     sampling: Sampling, callback=None, preview=None) -> EditResult:
    """`instruct` inside a mask where the model sees only the mask's box plus `mask_crop` pixels around it (the
    reference edit-inpaint pipeline's padding_mask_crop): finer detail on a large picture, less of it for the
    instruction. The crop's result is pasted back at the input's size."""
    x0, y0, x1, y1 = crop_box(mask, mask_crop, 0)

    def pasted(crop: np.ndarray) -> np.ndarray:
        whole = image.copy()
        whole[y0:y1, x0:x1] = crop  # outside the mask the crop is the input's bytes: so is the whole
        return whole

    edit = instruct(engine, image[y0:y1, x0:x1], mask[y0:y1, x0:x1], pictures, sampling, None, callback,
                    mapped(preview, pasted))
    return replace(edit, image=pasted(edit.image), latent=None, box=(x0, y0, x1, y1))
