"""`qimg chain`: a YAML list of inpaint/outpaint edits (Qwen-Image) or of instruction edits (`edit:`, an Edit
model) run in one process, the latent carried in memory from one edit to the next (canvas.py says why and how).
Each instruction edit takes its own seed, derived from the chain's (or its own) and its place in the chain:
one seed repeated over rounds of instruction edits is known to oversaturate.

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

from qimg.cli.presets import NOT_IN_PRESETS, check_options, describe, find, option_params, parser_message, read_yaml
from qimg.engine.canvas import Canvas, edited, grow, window_size
from qimg.engine.preview import mapped
from qimg.errors import QimgError, UsageError, failure_line
from qimg.jobs import names
from qimg.jobs.edit_inputs import check_strength, inpaint_mask
from qimg.masks import ensure_not_empty, outpaint_margins

KINDS = ("inpaint", "outpaint", "edit")
# set once for the whole chain, on its command line
CHAIN_LEVEL = {"out", "overwrite", "json_", "model", "device", "dtype", "cache_dir", "no_cache", "cache_size",
               "offload", "compile_", "attention", "vae_tiling", "no_worker", "preview", "preview_every",
               "lora", "transformer", "dequantize", "quantize"}
BATCH_ONLY = {"out_dir", "skip_existing", "mask_dir",  # inpaint/outpaint over many files: no place in a chain
              "shard", "ray", "ray_workers", "retries"}
# edit's --size and --mask-crop: a chain's canvas keeps its size, and its latent covers the whole of it
NOT_IN_EDITS = CHAIN_LEVEL | BATCH_ONLY | {"size", "mask_crop"}
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
        raise UsageError(f"chain {path}: needs `edits:`, a list of {{inpaint: {{...}}}}, {{outpaint: {{...}}}} or "
                         "{edit: {...}}")
    if len(edits) > MAX_EDITS:
        raise UsageError(f"chain {path} has {len(edits)} edits; the limit is {MAX_EDITS} (split it: a chain can "
                         "start from the output of another)")
    # The file's defaults: options every edit takes, of a chain of instruction edits or of inpaints and outpaints
    # (an Edit model runs only the first kind, a Qwen-Image model only the others).
    by_instruction = all(isinstance(e, dict) and list(e) == ["edit"] for e in edits)
    group = [commands[kind] for kind in (("edit",) if by_instruction else ("inpaint", "outpaint"))]
    shared = set.intersection(*({p.name for p in option_params(c).values()} for c in group))
    only_one = {p.name for c in commands.values() for p in c.params} - shared
    defaults = check_options(ctx, group[0], data, f"chain {path}", only_one | NOT_IN_EDITS | {"preset"})
    steps = []
    for index, entry in enumerate(edits, 1):
        where = f"chain {path} edit {index}"
        if not (isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in KINDS):
            raise UsageError(f"{where}: expected {{inpaint: {{...}}}}, {{outpaint: {{...}}}} or {{edit: {{...}}}}, "
                             f"not {describe(entry)}")
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
        if resolved.get("ref"):
            resolved["ref"] = [path.parent / ref for ref in resolved["ref"]]
        if kind == "edit" and not (resolved.get("prompt") or "").strip():
            raise UsageError(f"{where}: the prompt is empty: say what to change, e.g. prompt: replace the sky "
                             "with a sunset")
        steps.append(Step(index, kind, where, {**resolved, "preset": preset}))
    return steps


def files_read(path: Path, steps: list[Step]) -> tuple[Path, ...]:
    """The chain file and the mask and picture files its edits name: a chain only reads them, and no output
    replaces them."""
    return (path, *(s.options["mask"] for s in steps if s.options.get("mask") is not None),
            *(ref for s in steps for ref in s.options.get("ref") or ()))


def step_files(image: Path, steps: list[Step], folder: Path) -> dict[int, Path]:
    """--keep-steps: each edit's image, `<stem>.<NN>-<kind>.png` in `folder`, by edit index. Fixed names, like a
    batch's outputs, so a folder holds one run's steps: existing ones are replaced only with --overwrite."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--keep-steps {folder} is a file; give a folder")
    return {s.index: names.kept_step(folder, image, s.index, s.kind) for s in steps}


def resolve(command, kind: str, values: dict, where: str) -> dict:
    """All of the command's parameters: `values`, and the command's defaults for the rest."""
    from typer.exceptions import TyperException

    try:
        return command.make_context(kind, ["-"], default_map=values).params
    except TyperException as e:
        raise UsageError(f"{where}: {parser_message(e.format_message())}") from None
    except UsageError as e:  # a value the command's callback parses (to: WxH)
        raise UsageError(f"{where}: {e}") from None


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
            elif step.kind == "edit" and not masked(step):
                margins = None
                if o["strength"] < 1:
                    raise UsageError(f"strength {o['strength']} needs a mask (mask or rect): without one the whole "
                                     "picture is made anew")
            else:
                margins = None
                ensure_not_empty(edit_mask(step, size, picture), "the mask")
            planned.append(Planned(step, margins, size))
        except QimgError as e:
            raise QimgError(f"{step.where}: {e}", e.code) from None
    return planned


def masked(step: Step) -> bool:
    """Whether an edit has a mask: inpaint always (its input's transparency may be it), an instruction edit
    only with mask or rect (without, it edits the whole picture)."""
    return step.kind != "edit" or bool(step.options["mask"] or step.options["rect"])


def edit_mask(step: Step, size: tuple[int, int], picture) -> np.ndarray:
    """An inpaint edit's mask on a canvas of size (W, H); the input's transparency counts for the first edit."""
    o = step.options
    return inpaint_mask(size, picture if step.index == 1 else None, "the input", o["mask"], o["rect"],
                        o["mask_resize"], o["invert_mask"], o["grow"], o["feather"])


def sampling(step: Step, defaults, seed: int) -> dict:
    """The engine's arguments for an edit, with the model's defaults filled in: exactly what, with the mask
    and the input, determines its result."""
    o = step.options
    seed = seed if o["seed"] is None else o["seed"]
    if step.kind == "edit":
        seed = step_seed(seed, step.index)
        extra = dict(edit_area=o["edit_area"] or defaults.edit_area,
                     vision_area=o["vision_area"] or defaults.vision_area)
    else:
        extra = dict(attn_mask=o["attn_mask"] == "on", context=o["context"])
    return dict(prompt=o["prompt"], negative_prompt=defaults.negative_prompt if o["negative_prompt"] is None
                else o["negative_prompt"], steps=o["steps"] or defaults.steps,
                cfg=defaults.cfg if o["cfg"] is None else o["cfg"], seed=seed, strength=o["strength"], **extra,
                **{k: o[k] for k, off in SHORTCUTS_OFF.items() if o[k] not in (None, off)})  # on: earlier keys stay


def step_seed(seed: int, index: int) -> int:
    """An instruction edit's own seed: fixed by the chain's seed and the edit's index."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0edit {index}".encode()).digest()[:4], "big")


SHORTCUTS_OFF = {"reuse": 0.0, "cfg_until": 1.0, "shift": None}  # sampling.Shortcuts' fields at their defaults


def engine_args(args: dict) -> dict:
    """`sampling`'s arguments as edit_canvas takes them: the shortcuts as one Shortcuts."""
    from qimg.sampling import Shortcuts

    args = {**{k: v for k, v in args.items() if k not in SHORTCUTS_OFF},
            "shortcuts": Shortcuts(**{k: args.get(k, off) for k, off in SHORTCUTS_OFF.items()})}
    if "edit_area" in args:  # an instruction edit
        from qimg.engine.instruct import Areas

        args["areas"] = Areas(args.pop("edit_area"), args.pop("vision_area"))
    return args


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run(engine, planned: list[Planned], pixels: np.ndarray, picture, seed: int, reporter, preview=None):
    """Run the edits, yielding (Planned, the canvas after it, its lineage entry) as each completes; edits whose
    key is in the engine's cache (None: no cache) are read from it instead of run. picture: the input, as
    load_image gave it (its transparency may be the first edit's mask). Progress goes to the reporter
    (report.Reporter); `preview` (preview.Preview) sees the rendered canvas as each edit that runs samples."""
    from qimg.cache import array_hash
    from qimg.engine import instruct
    from qimg.images import load_image
    from qimg.sampling import first_step

    store = engine.cache
    canvas = Canvas.start(pixels)
    key = key_of("chain", array_hash(pixels), engine.model_fingerprint, str(engine.dtype), engine.device.type)
    for p in planned:
        args, by_instruction = sampling(p.step, engine.defaults, seed), p.step.kind == "edit"
        try:
            refs = [load_image(ref)[0] for ref in p.step.options["ref"] or ()] if by_instruction else []
            if p.margins:
                canvas, mask = grow(canvas, p.margins, p.step.options["feather"])
            else:  # its mask file may have changed since planning
                mask = ensure_not_empty(edit_mask(p.step, canvas.size, picture), "the mask") if masked(p.step) \
                    else None
        except QimgError as e:
            raise QimgError(f"{p.step.where}: {e}", e.code) from None
        key = key_of(key, p.step.kind, args, None if mask is None else array_hash(mask), p.margins,
                     *([list(map(array_hash, refs))] if by_instruction else []))
        work = instruct.working_size(canvas.size, instruct.Areas(args["edit_area"], args["vision_area"])) \
            if by_instruction else None
        hit = store.get("chain", key, [engine.latent_spec(*work)] if work else expected(engine, canvas)) \
            if store else None
        if hit:
            tensors = hit[0]
            if by_instruction:
                canvas = instruct.edited(instruct.settle(engine, canvas, work), mask, tensors["latent"], work)
            else:
                canvas = edited(canvas, mask, tensors["latent"]) if "latent" in tensors else Canvas.start(
                    tensors["pixels"].numpy())
            ran = calls = 0
        else:
            ran = args["steps"] - first_step(args["steps"], args["strength"])
            try:
                callback, done = reporter.steps(f"edit {p.step.index}/{len(planned)} {p.step.kind}", ran)
                calls = engine.calls
                if by_instruction:
                    canvas = instruct.edit_canvas(engine, canvas, mask, refs, **engine_args(args), callback=callback,
                                                  preview=mapped(preview, engine.render))[0]
                else:
                    canvas = engine.edit_canvas(canvas, mask, **engine_args(args), callback=callback, preview=preview)
                calls = engine.calls - calls
                done()
            except QimgError as e:
                raise QimgError(f"{p.step.where}: {e}", e.code) from None
            except Exception as e:  # out of memory, a broken weight file...: still say which edit failed
                raise QimgError(f"{p.step.where}: {failure_line(e)}") from e
            if store:
                store.put("chain", key, _tensors(canvas), {"edit": p.step.index, "kind": p.step.kind})
        # Fields named as in a single edit's metadata hold the same values there and here (attn_mask "on"/"off").
        settings = args if by_instruction else {**args, "attn_mask": p.step.options["attn_mask"]}
        pictures = dict(refs_sha256=list(map(array_hash, refs))) if by_instruction else {}
        lineage = dict(index=p.step.index, kind=p.step.kind, **settings, preset=p.step.options["preset"], **pictures,
                       mask_sha256=None if mask is None else array_hash(mask), margins=p.margins, key=key[:16],
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
