"""A chain's edits on the engine, one at a time (jobs/chain_plan.py plans the chain, keys its edits and walks
it): each edit applied to the canvas the one before it left, its latent carried (canvas.py says why), or its
result restored from the chain cache under the key the job gives, and stored there once it has run."""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qimg.engine import instruct
from qimg.engine.canvas import Canvas, edited, window_size
from qimg.engine.instruct import Pictures
from qimg.engine.preview import mapped
from qimg.engine.request import Sampling
from qimg.option_values import CONTEXT


@dataclass(frozen=True)
class ChainEdit:
    """One edit of a chain as the engine runs it; with its mask and the canvas, all that determines its result."""

    kind: str  # "inpaint", "outpaint" (Qwen-Image, on the canvas's latent window) or "edit" (by instruction)
    sampling: Sampling
    pictures: Optional[Pictures] = None  # an instruction edit's reference pictures and areas
    attn_mask: bool = False  # an inpaint's or outpaint's
    context: int = CONTEXT


def apply(engine, canvas: Canvas, mask: Optional[np.ndarray], edit: ChainEdit, callback=None,
          preview=None) -> Canvas:
    """The canvas after `edit` inside mask (H, W) (None: an instruction edit of the whole picture), run on the
    engine; `preview` (preview.Preview) sees each step's estimate of the canvas rendered."""
    if engine.kind.family == "qwen-image-2.1":  # pixels in, pixels out: its latents are not carried
        result = engine.edit(canvas.pixels, edit.pictures.refs, mask, edit.pictures.areas.edit, edit.sampling,
                             None, callback, preview)
        return Canvas.start(result.image)
    if edit.kind == "edit":
        return instruct.edit_canvas(engine, canvas, mask, edit.pictures, edit.sampling, callback,
                                    preview=mapped(preview, engine.render))[0]
    return engine.edit_canvas(canvas, mask, edit.sampling, edit.attn_mask, edit.context, callback, preview)


def cached(engine, key: str, canvas: Canvas, mask: Optional[np.ndarray], edit: ChainEdit) -> Optional[Canvas]:
    """The canvas after `edit` as the engine's cache holds it under `key`; None when it does not (or there is
    no cache)."""
    if engine.cache is None:
        return None
    if engine.kind.family == "qwen-image-2.1":
        hit = engine.cache.get("chain", key, {"pixels": ("uint8", (canvas.size[1], canvas.size[0], 4))})
        return Canvas.start(hit[0]["pixels"].numpy()) if hit else None
    work = instruct.working_size(canvas.size, edit.pictures.areas) if edit.kind == "edit" else None
    hit = engine.cache.get("chain", key, [engine.latent_spec(*work)] if work else expected(engine, canvas))
    if not hit:
        return None
    tensors = hit[0]
    if work:
        return instruct.edited(instruct.settle(engine, canvas, work), mask, tensors["latent"], work)
    return edited(canvas, mask, tensors["latent"]) if "latent" in tensors else Canvas.start(tensors["pixels"].numpy())


def store(engine, key: str, canvas: Canvas, record: dict) -> None:
    """Keep the canvas an edit left under `key` in the engine's cache (none: nothing), with `record` beside it."""
    if engine.cache is not None:
        engine.cache.put("chain", key, _tensors(canvas), record)


def expected(engine, canvas: Canvas) -> list:
    """What a cached edit of `canvas` may hold: the latent of its window, or pixels of its size."""
    width, height = window_size(canvas.size, canvas.origin)
    return [engine.latent_spec(width, height), {"pixels": ("uint8", (canvas.size[1], canvas.size[0], 3))}]


def _tensors(canvas: Canvas) -> dict:
    import torch

    if canvas.latent is not None:
        return {"latent": canvas.latent}
    return {"pixels": torch.from_numpy(np.ascontiguousarray(canvas.pixels))}
