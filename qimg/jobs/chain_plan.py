"""`qimg chain`'s edits, planned and walked: a list of inpaint/outpaint edits (Qwen-Image) or of instruction edits
(an Edit model), read from the chain file by the command line (cli/chain_file.py), run in one process with the
latent carried in memory from one edit to the next (canvas.py says why and how; engine/chain.py runs each
edit). Each instruction edit takes its own seed, derived from the chain's (or its own) and its place in the
chain: one seed repeated over rounds of instruction edits is known to oversaturate.

Every edit's mask is built before any model loads (`plan`), so a mistake in edit 5 costs nothing. Each edit's
result is cached under a key chained from its input's key and what determines it (sampling settings, the
mask's values, the outpaint margins), so a re-run after changing edit k finds edits 1..k-1 in the cache and
recomputes only k..n.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qimg.errors import QimgError, UsageError, failure_line
from qimg.jobs import names
from qimg.jobs.batch import name_seed
from qimg.jobs.edit_inputs import check_strength, inpaint_mask
from qimg.jobs.spec import ChainStep, InpaintMask, Outpaint
from qimg.masks import ensure_not_empty, outpaint_margins


@dataclass(frozen=True)
class Planned:
    step: ChainStep
    margins: tuple[int, int, int, int] | None  # outpaint: (left, right, top, bottom)
    size: tuple[int, int]  # (W, H) of the canvas after this edit


def files_read(path: Path, steps: list[ChainStep]) -> tuple[Path, ...]:
    """The chain file and the mask and picture files its edits name: a chain only reads them, and no output
    replaces them."""
    return (path, *(s.shape.mask for s in steps if isinstance(s.shape, InpaintMask) and s.shape.mask is not None),
            *(ref for s in steps for ref in s.refs))


def step_files(image: Path, steps: list[ChainStep], folder: Path) -> dict[int, Path]:
    """--keep-steps: each edit's image, `<stem>.<NN>-<kind>.png` in `folder`, by edit index. Fixed names, like a
    batch's outputs, so a folder holds one run's steps: existing ones are replaced only with --overwrite."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--keep-steps {folder} is a file; give a folder")
    return {s.index: names.kept_step(folder, image, s.index, s.kind) for s in steps}


def word_regions(steps: list[ChainStep], pixels: np.ndarray, store) -> dict[int, np.ndarray]:
    """Each mask_prompt edit's region (word_masks.py), by edit index, segmented on the chain's input before
    the image model loads: the edits after it see that input's pixels where they keep them."""
    from qimg.jobs.word_masks import WordMasks, release

    regions = {}
    try:
        for step in steps:
            if isinstance(step.shape, InpaintMask) and step.shape.words is not None:
                try:
                    regions[step.index] = WordMasks(step.shape.words, store).region(pixels, "the input")
                except QimgError as e:
                    raise QimgError(f"{step.where}: {e}", e.code) from None
    finally:
        release()  # an edit's failure too: the segmentation model never stays for the image model
    return regions


def plan(steps: list[ChainStep], size: tuple[int, int], picture, regions: dict | None = None) -> list[Planned]:
    """Check every edit on the canvas size it will see, before anything loads: an inpaint's mask is built and
    dropped (run builds it again), so planning holds one mask at a time however many edits there are.
    regions: word_regions'."""
    planned = []
    for step in steps:
        shape = step.shape
        try:
            check_strength(step.strength)
            margins = None
            if isinstance(shape, Outpaint):
                margins = outpaint_margins(size, shape.left, shape.right, shape.top, shape.bottom, shape.expand,
                                           shape.to, shape.anchor)
                size = size[0] + margins[0] + margins[1], size[1] + margins[2] + margins[3]
            elif shape is None:  # an instruction edit of the whole picture
                if step.strength < 1:
                    raise UsageError(f"strength {step.strength} needs a mask (mask or rect): without one the whole "
                                     "picture is made anew")
            else:
                ensure_not_empty(edit_mask(step, size, picture, regions), "the mask")
            planned.append(Planned(step, margins, size))
        except QimgError as e:
            raise QimgError(f"{step.where}: {e}", e.code) from None
    return planned


def edit_mask(step: ChainStep, size: tuple[int, int], picture, regions: dict | None = None) -> np.ndarray:
    """An inpaint edit's mask on a canvas of size (W, H); the input's transparency counts for the first edit.
    regions: word_regions' (segmented on the input, so the canvas must still have the input's size)."""
    s = step.shape
    region = (regions or {}).get(step.index)
    if region is not None and region.shape != (size[1], size[0]):
        raise UsageError(f"mask_prompt segments the chain's input ({region.shape[1]}x{region.shape[0]}), and this "
                         f"edit's canvas is {size[0]}x{size[1]}: put the edit before the outpaint")
    return inpaint_mask(size, picture if step.index == 1 else None, "the input", s.mask, s.rect, s.mask_resize,
                        s.invert_mask, s.grow, s.feather, region)


def request(step: ChainStep, defaults, seed: int, refs: list[np.ndarray]):
    """The edit as the engine takes it (engine.chain.ChainEdit), the model's `defaults` filled in: with the mask
    and the canvas, exactly what determines its result. seed: the chain's, unless the edit has its own."""
    from qimg.engine.chain import ChainEdit
    from qimg.engine.instruct import Areas, Pictures

    seed = seed if step.prompt.seed is None else step.prompt.seed
    if step.kind != "edit":
        return ChainEdit(step.kind, step.prompt.resolve(defaults, seed, step.strength),
                         attn_mask=step.attn_mask == "on", context=step.context)
    areas = Areas(step.edit_area or defaults.edit_area, step.vision_area or defaults.vision_area)
    return ChainEdit("edit", step.prompt.resolve(defaults, step_seed(seed, step.index), step.strength),
                     Pictures(refs, areas))


def settings(edit) -> dict:
    """What, besides the mask, the margins and the pictures, determines an edit's result (a ChainEdit's values):
    part of its cache key, and of its lineage. The shortcuts appear only when on, so keys made before a
    shortcut existed still match."""
    from qimg.sampling import Shortcuts

    s = edit.sampling
    if edit.kind == "edit":
        extra = dict(edit_area=edit.pictures.areas.edit, vision_area=edit.pictures.areas.vision)
    else:
        extra = dict(attn_mask=edit.attn_mask, context=edit.context)
    shortcuts = {k: v for k, v in asdict(s.shortcuts).items() if v != getattr(Shortcuts(), k)}
    return dict(prompt=s.prompt, negative_prompt=s.negative_prompt, steps=s.steps, cfg=s.cfg, seed=s.seed,
                strength=s.strength, **extra, **shortcuts)


def step_seed(seed: int, index: int) -> int:
    """An instruction edit's own seed: fixed by the chain's seed and the edit's index."""
    return name_seed(seed, f"edit {index}")


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run(engine, planned: list[Planned], pixels: np.ndarray, picture, seed: int, reporter, preview=None,
        regions: dict | None = None, store: bool = True):
    """Run the edits, yielding (Planned, the canvas after it, its lineage entry) as each completes; edits whose
    key is in the engine's cache (None: no cache) are read from it instead of run, and (store) those run are
    kept in it: not under the safety filter's image check, which sees only the kept steps and the output, so a
    flagged or unchecked canvas never stays on disk. picture: the input, as
    load_image gave it (its transparency may be the first edit's mask). Progress goes to the reporter
    (report.Reporter); `preview` (preview.Preview) sees the rendered canvas as each edit that runs samples."""
    from qimg.cache import array_hash
    from qimg.engine import chain
    from qimg.engine.canvas import Canvas, grow
    from qimg.images import load_image

    canvas = Canvas.start(pixels)
    key = key_of("chain", array_hash(pixels), engine.model_fingerprint, str(engine.dtype), engine.device.type)
    for p in planned:
        step = p.step
        try:
            refs = [np.asarray(load_image(ref)[1].convert("RGBA")) if engine.kind.rgba else load_image(ref)[0]
                    for ref in step.refs]
            if p.margins:
                canvas, mask = grow(canvas, p.margins, step.shape.feather)
            else:  # its mask file may have changed since planning
                mask = ensure_not_empty(edit_mask(step, canvas.size, picture, regions), "the mask") \
                    if isinstance(step.shape, InpaintMask) else None
        except QimgError as e:
            raise QimgError(f"{step.where}: {e}", e.code) from None
        edit = request(step, engine.defaults, seed, refs)
        values = settings(edit)
        key = key_of(key, step.kind, values, None if mask is None else array_hash(mask), p.margins,
                     *([list(map(array_hash, refs))] if step.kind == "edit" else []))
        found = chain.cached(engine, key, canvas, mask, edit)
        if found is not None:
            canvas, ran, calls = found, 0, 0
        else:
            ran = edit.sampling.steps_run
            try:
                callback, done = reporter.steps(f"edit {step.index}/{len(planned)} {step.kind}", ran)
                calls = engine.calls
                canvas = chain.apply(engine, canvas, mask, edit, callback, preview)
                calls = engine.calls - calls
                done()
            except QimgError as e:
                raise QimgError(f"{step.where}: {e}", e.code) from None
            except Exception as e:  # out of memory, a broken weight file...: still say which edit failed
                raise QimgError(f"{step.where}: {failure_line(e)}") from e
            if store:
                chain.store(engine, key, canvas, {"edit": step.index, "kind": step.kind})
        # Fields named as in a single edit's metadata hold the same values there and here (attn_mask "on"/"off").
        if step.kind != "edit":
            values["attn_mask"] = step.attn_mask
        pictures = dict(refs_sha256=list(map(array_hash, refs))) if step.kind == "edit" else {}
        lineage = dict(index=step.index, kind=step.kind, **values, preset=step.preset, **pictures,
                       mask_sha256=None if mask is None else array_hash(mask), margins=p.margins, key=key[:16],
                       cache="off" if engine.cache is None else "miss" if found is None else "hit", steps_run=ran,
                       calls=calls)
        yield p, canvas, lineage
