"""`qimg chain`: a YAML list of inpaint/outpaint edits run in one process, the latent carried in memory from
one edit to the next (canvas.py says why and how).

The file is read whole and every edit's mask is built before any model loads, so a mistake in edit 5 costs
nothing. Each edit's result is cached under a key chained from its input's key and what determines it
(sampling settings, the mask's values, the outpaint margins), so a re-run after changing edit k finds
edits 1..k-1 in the cache and recomputes only k..n.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .canvas import Canvas, edited, grow, window_size
from .edits import check_strength, inpaint_mask, outpaint_margins
from .errors import QimgError, UsageError, failure_line
from .masks import ensure_not_empty
from .presets import NOT_IN_PRESETS, check_options, describe, find, option_params, parser_message, read_yaml

KINDS = ("inpaint", "outpaint")
# set once for the whole chain, on its command line
CHAIN_LEVEL = {"out", "overwrite", "json_", "model", "device", "dtype", "cache_dir", "no_cache", "cache_size",
               "offload", "compile_", "attention", "vae_tiling", "no_worker"}
BATCH_ONLY = {"out_dir", "skip_existing", "mask_dir",  # inpaint/outpaint over many files: no place in a chain
              "shard", "ray", "ray_workers", "retries"}
NOT_IN_EDITS = CHAIN_LEVEL | BATCH_ONLY
# Every edit's mask is built (a float per canvas pixel) before the model loads, and YAML aliases let a 256 KB
# file list ~20,000 edits: without a cap such a file costs minutes and tens of GB before any check fails.
MAX_EDITS = 100


@dataclass(frozen=True)
class Step:
    index: int  # 1-based, as errors and reports say it
    kind: str
    where: str  # how errors name it: the chain file, the index, the kind
    options: dict  # the command's parameters, resolved: edit > its preset > file defaults; overrides win


@dataclass(frozen=True)
class Planned:
    step: Step
    margins: tuple[int, int, int, int] | None  # outpaint: (left, right, top, bottom)
    size: tuple[int, int]  # (W, H) of the canvas after this edit


def read_chain(ctx, path: Path, overrides: dict) -> list[Step]:
    """Every edit of a chain file with its options resolved and checked like the command line's."""
    commands = {kind: ctx.parent.command.commands[kind] for kind in KINDS}
    data = read_yaml(path, "chain")
    edits = data.pop("edits", None)
    if not isinstance(edits, list) or not edits:
        raise UsageError(f"chain {path}: needs `edits:`, a list of {{inpaint: {{...}}}} or {{outpaint: {{...}}}}")
    if len(edits) > MAX_EDITS:
        raise UsageError(f"chain {path} has {len(edits)} edits; the limit is {MAX_EDITS} (split it: a chain can "
                         "start from the output of another)")
    shared = {p.name for p in option_params(commands["inpaint"]).values()} & {
        p.name for p in option_params(commands["outpaint"]).values()}
    only_one = {p.name for c in commands.values() for p in c.params} - shared
    defaults = check_options(ctx, commands["inpaint"], data, f"chain {path}", only_one | NOT_IN_EDITS | {"preset"})
    steps = []
    for index, entry in enumerate(edits, 1):
        where = f"chain {path} edit {index}"
        if not (isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in KINDS):
            raise UsageError(f"{where}: expected {{inpaint: {{...}}}} or {{outpaint: {{...}}}}, not {describe(entry)}")
        (kind, options), = entry.items()
        where, command = f"{where} ({kind})", commands[kind]
        if not isinstance(options, dict):
            raise UsageError(f"{where}: expected a mapping of {kind} options, not {describe(options)}")
        values = check_options(ctx, command, options, where, NOT_IN_EDITS)
        preset = values.pop("preset", None)
        layer = {}
        if preset:
            try:
                file = find(preset)
                text = read_yaml(file, "preset")
            except UsageError as e:
                raise UsageError(f"{where}: {e}") from None
            layer = check_options(ctx, command, text, f"{where}: preset {file}", NOT_IN_PRESETS | NOT_IN_EDITS)
        resolved = resolve(command, kind, {**defaults, **layer, **values, **overrides}, where)
        if resolved.get("mask") is not None:
            resolved["mask"] = path.parent / resolved["mask"]  # relative to the chain file; absolute stays
        steps.append(Step(index, kind, where, {**resolved, "preset": preset}))
    return steps


def files_read(path: Path, steps: list[Step]) -> tuple[Path, ...]:
    """The chain file and the mask files its edits name: a chain only reads them, and no output replaces them."""
    return (path, *(s.options["mask"] for s in steps if s.options.get("mask") is not None))


def step_files(image: Path, steps: list[Step], folder: Path) -> dict[int, Path]:
    """--keep-steps: each edit's image, `<stem>.<NN>-<kind>.png` in `folder`, by edit index. Fixed names, like a
    batch's outputs, so a folder holds one run's steps: existing ones are replaced only with --overwrite."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--keep-steps {folder} is a file; give a folder")
    return {s.index: folder / f"{image.stem}.{s.index:02d}-{s.kind}.png" for s in steps}


def resolve(command, kind: str, values: dict, where: str) -> dict:
    """All of the command's parameters: `values`, and the command's defaults for the rest."""
    from typer.exceptions import TyperException

    try:
        return command.make_context(kind, ["-"], default_map=values).params
    except TyperException as e:
        raise UsageError(f"{where}: {parser_message(e.format_message())}") from None


def plan(steps: list[Step], size: tuple[int, int], picture) -> list[Planned]:
    """Check every edit on the canvas size it will see, before anything loads: an inpaint's mask is built and
    dropped (run builds it again), so planning holds one mask at a time however many edits there are."""
    planned = []
    for step in steps:
        o = step.options
        try:
            check_strength(o["strength"])
            if step.kind == "outpaint":
                margins = outpaint_margins(size, o["left"], o["right"], o["top"], o["bottom"], o["expand"], o["to"],
                                           o["anchor"])
                size = size[0] + margins[0] + margins[1], size[1] + margins[2] + margins[3]
            else:
                margins = None
                ensure_not_empty(edit_mask(step, size, picture), "the mask")
            planned.append(Planned(step, margins, size))
        except QimgError as e:
            raise QimgError(f"{step.where}: {e}", e.code) from None
    return planned


def edit_mask(step: Step, size: tuple[int, int], picture) -> np.ndarray:
    """An inpaint edit's mask on a canvas of size (W, H); the input's transparency counts for the first edit."""
    o = step.options
    return inpaint_mask(size, picture if step.index == 1 else None, "the input", o["mask"], o["rect"],
                        o["mask_resize"], o["invert_mask"], o["grow"], o["feather"])


def sampling(step: Step, defaults, seed: int) -> dict:
    """The engine's arguments for an edit, with the model's defaults filled in: exactly what, with the mask
    and the input, determines its result."""
    o = step.options
    return dict(prompt=o["prompt"], negative_prompt=defaults.negative_prompt if o["negative_prompt"] is None
                else o["negative_prompt"], steps=o["steps"] or defaults.steps,
                cfg=defaults.cfg if o["cfg"] is None else o["cfg"], seed=seed if o["seed"] is None else o["seed"],
                strength=o["strength"], attn_mask=o["attn_mask"] == "on", context=o["context"],
                **{k: o[k] for k, off in SHORTCUTS_OFF.items() if o[k] not in (None, off)})  # on: earlier keys stay


SHORTCUTS_OFF = {"reuse": 0.0, "cfg_until": 1.0}  # sampling.Shortcuts' fields at their defaults


def engine_args(args: dict) -> dict:
    """`sampling`'s arguments as edit_canvas takes them: the shortcuts as one Shortcuts."""
    from .sampling import Shortcuts

    return {**{k: v for k, v in args.items() if k not in SHORTCUTS_OFF},
            "shortcuts": Shortcuts(**{k: args.get(k, off) for k, off in SHORTCUTS_OFF.items()})}


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run(engine, planned: list[Planned], pixels: np.ndarray, picture, seed: int, reporter):
    """Run the edits, yielding (Planned, the canvas after it, its lineage entry) as each completes; edits whose
    key is in the engine's cache (None: no cache) are read from it instead of run. picture: the input, as
    load_image gave it (its transparency may be the first edit's mask). Progress goes to the reporter
    (report.Reporter)."""
    from .cache import array_hash
    from .sampling import first_step

    store = engine.cache
    canvas = Canvas.start(pixels)
    key = key_of("chain", array_hash(pixels), engine.model_fingerprint, str(engine.dtype), engine.device.type)
    for p in planned:
        args = sampling(p.step, engine.defaults, seed)
        if p.margins:
            canvas, mask = grow(canvas, p.margins, p.step.options["feather"])
        else:
            try:
                mask = ensure_not_empty(edit_mask(p.step, canvas.size, picture), "the mask")
            except QimgError as e:  # its mask file changed since planning
                raise QimgError(f"{p.step.where}: {e}", e.code) from None
        key = key_of(key, p.step.kind, args, array_hash(mask), p.margins)
        hit = store.get("chain", key, expected(engine, canvas)) if store else None
        if hit:
            tensors = hit[0]
            canvas = edited(canvas, mask, tensors["latent"]) if "latent" in tensors else Canvas.start(
                tensors["pixels"].numpy())
            ran = calls = 0
        else:
            ran = args["steps"] - first_step(args["steps"], args["strength"])
            try:
                callback, done = reporter.steps(f"edit {p.step.index}/{len(planned)} {p.step.kind}", ran)
                calls = engine.calls
                canvas = engine.edit_canvas(canvas, mask, **engine_args(args), callback=callback)
                calls = engine.calls - calls
                done()
            except QimgError as e:
                raise QimgError(f"{p.step.where}: {e}", e.code) from None
            except Exception as e:  # out of memory, a broken weight file...: still say which edit failed
                raise QimgError(f"{p.step.where}: {failure_line(e)}") from e
            if store:
                store.put("chain", key, _tensors(canvas), {"edit": p.step.index, "kind": p.step.kind})
        # Fields named as in a single edit's metadata hold the same values there and here (attn_mask "on"/"off").
        settings = {**args, "attn_mask": p.step.options["attn_mask"]}
        lineage = dict(index=p.step.index, kind=p.step.kind, **settings, preset=p.step.options["preset"],
                       mask_sha256=array_hash(mask), margins=p.margins, key=key[:16],
                       cache="off" if store is None else "hit" if hit else "miss", steps_run=ran, calls=calls)
        yield p, canvas, lineage


def expected(engine, canvas: Canvas) -> list:
    """What a cached edit of `canvas` may hold: the latent of its window, or pixels of its size."""
    width, height = window_size(canvas.size, canvas.origin)
    return [engine.latent_spec(width, height), {"pixels": ("uint8", (canvas.size[1], canvas.size[0], 3))}]


def _tensors(canvas: Canvas) -> dict:
    import torch

    if canvas.latent is not None:
        return {"latent": canvas.latent}
    return {"pixels": torch.from_numpy(np.ascontiguousarray(canvas.pixels))}
