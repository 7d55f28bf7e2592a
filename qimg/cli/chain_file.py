"""A chain file read into the chain job's steps (jobs.spec.ChainStep): YAML with optional defaults, then
`edits:`, a list of {inpaint: {...}}, {outpaint: {...}} or {edit: {...}}, each edit's options checked and resolved
as its command's would be on the command line (its own values, then its preset's, then the file's defaults, the
chain's command line over all). Planning and running the steps is the job layer's (jobs/chain_plan.py)."""

from pathlib import Path

from qimg.cli.options import SAFETY_PARAMS
from qimg.cli.presets import NOT_IN_PRESETS, check_options, describe, find, option_params, parser_message, read_yaml
from qimg.cli.to_job import shortcuts_of, words_of
from qimg.errors import UsageError
from qimg.jobs import spec

KINDS = ("inpaint", "outpaint", "edit")
# set once for the whole chain, on its command line
CHAIN_LEVEL = {"out", "overwrite", "json_", "metadata", "model", "device", "dtype", "cache_dir", "no_cache",
               "cache_size", "offload", "compile_", "attention", "vae_tiling", "no_worker", "preview", "preview_every",
               "lora", "transformer", "dequantize", "quantize", "devices", "split", "text_encoder", "vae", "vision",
               *SAFETY_PARAMS, "background", "quiet", "cfg_parallel", "ulysses", "tp"}
BATCH_ONLY = {"out_dir", "skip_existing", "mask_dir", "save_mask",  # over many files: no place in a chain
              "shard", "ray", "ray_workers", "retries"}
# edit's --size and --mask-crop: a chain's canvas keeps its size, and its latent covers the whole of it
NOT_IN_EDITS = CHAIN_LEVEL | BATCH_ONLY | {"size", "mask_crop"}
# Every edit's mask is built (a float per canvas pixel) before the model loads, and YAML aliases let a 256 KB
# file list ~20,000 edits: without a cap such a file costs minutes and tens of GB before any check fails.
MAX_EDITS = 100


def read_chain(ctx, path: Path, overrides: dict) -> list[spec.ChainStep]:
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
        steps.append(step_of(index, kind, where, resolved, preset))
    return steps


def resolve(command, kind: str, values: dict, where: str) -> dict:
    """All of the command's parameters: `values`, and the command's defaults for the rest."""
    from typer.exceptions import TyperException

    try:
        return command.make_context(kind, ["-"], default_map=values).params
    except TyperException as e:
        raise UsageError(f"{where}: {parser_message(e.format_message())}") from None
    except UsageError as e:  # a value the command's callback parses (to: WxH)
        raise UsageError(f"{where}: {e}") from None


def step_of(index: int, kind: str, where: str, o: dict, preset) -> spec.ChainStep:
    """An edit's step from its command's resolved parameters `o`."""
    prompt = spec.Prompt(o["prompt"], o["negative_prompt"], o["steps"], o["cfg"], o["seed"], *shortcuts_of(o))
    if kind == "outpaint":
        shape = spec.Outpaint(o["left"], o["right"], o["top"], o["bottom"], o["expand"], o["to"], o["anchor"],
                              o["feather"])
    elif kind == "inpaint" or o["mask"] or o["rect"] or o["mask_prompt"]:  # no mask: the input's transparency
        shape = spec.InpaintMask(o["mask"], None, tuple(o["rect"] or ()), o["mask_resize"], o["invert_mask"],
                                 o["grow"], o["feather"], words_of(o))
    else:
        shape = None
    if kind == "edit":
        return spec.ChainStep(index, kind, where, prompt, shape, o["strength"], tuple(o["ref"] or ()),
                              edit_area=o["edit_area"], vision_area=o["vision_area"], preset=preset)
    return spec.ChainStep(index, kind, where, prompt, shape, o["strength"], attn_mask=o["attn_mask"],
                          context=o["context"], preset=preset)
