"""The parts of a job (spec.py) every model command declares alike, built from the command's parameters (its
`locals()`): the model, the cache, the output, the shortcuts, the --shard and --ray, and inpaint's and
outpaint's whole job; and the working folder every model command runs in, checked first."""

import os
import warnings
from pathlib import Path
from typing import Optional

from typer._click.core import ParameterSource

from qimg.errors import QimgWarning, UsageError
from qimg.jobs import spec
from qimg.option_values import RAY_RETRIES, SAFETY, SAFETY_THRESHOLD


def model_of(p: dict, part=None) -> spec.ModelSpec:
    """part: the --shard, whose torchrun LOCAL_RANK picks the GPU under --device auto."""
    from qimg.weights.lora import parse_spec

    layout = parallel_of(p)
    local_rank = part.local_rank if part is not None else None
    if layout is not None:
        local_rank = int(os.environ["LOCAL_RANK"]) if os.environ.get("LOCAL_RANK", "").isdigit() else None
    return spec.ModelSpec(p["model"], p["device"], p["dtype"], p["offload"], p["compile_"], p["attention"],
                          p["vae_tiling"], tuple(parse_spec(text) for text in p["lora"] or ()), p["transformer"],
                          p["dequantize"], p["quantize"], local_rank,
                          given_by("transformer") is ParameterSource.ENVIRONMENT, *devices_of(p, part),
                          p["text_encoder"], p["vae"], p["vision"], layout)


def devices_of(p: dict, part=None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """--devices and --split as tuples (empty: one device), refused with --device or each other's absence, and
    where every process would split over the same devices: Ray's actors (a GPU each) and torchrun's ranks
    (--shard auto from LOCAL_RANK). A --shard I/N or Slurm array task names its own devices."""
    if p["devices"] is None:
        if p["split"] is not None:
            raise UsageError(f"--split {p['split']} goes with --devices (the devices the blocks are split over)")
        return (), ()
    if p["device"] != "auto":
        raise UsageError(f"give --device {p['device']} or --devices {p['devices']}, not both")
    if p.get("ray") is not None:
        raise UsageError("--devices does not combine with --ray (each actor has one GPU); start one qimg per set "
                         "of devices with --shard I/N and its own --devices instead")
    if part is not None and part.local_rank is not None:
        raise UsageError(f"--devices does not combine with --shard auto under torchrun (every rank would split "
                         f"over {p['devices']}); start one qimg per set of devices with --shard I/N instead")
    devices = tuple(name.strip() for name in p["devices"].split(","))
    return devices, tuple(int(n) for n in p["split"].split(",")) if p["split"] is not None else ()


def parallel_of(p: dict):
    """--cfg-parallel, --ulysses and --tp as a parallel.layout.Layout (None: one process makes the image)."""
    from qimg.parallel.layout import Layout

    layout = Layout(p.get("cfg_parallel", False), p.get("ulysses", 1), p.get("tp", 1))
    if layout.world == 1:
        return None
    if p.get("ray") is not None:
        raise UsageError("--ray does not combine with --cfg-parallel, --ulysses or --tp yet; run the batch under "
                         "torchrun alone")
    return layout


def given_by(name: str):
    """Where the running command's parameter `name` came from (click's ParameterSource)."""
    from typer._click.globals import get_current_context

    return get_current_context().get_parameter_source(name)


def cache_of(p: dict) -> spec.CacheSpec:
    return spec.CacheSpec(p["cache_dir"], p["no_cache"], p["cache_size"])


def output_of(p: dict) -> spec.Output:
    return spec.Output(p["out"], p["overwrite"], p["json_"], p["preview"], preview_every(p), p["metadata"],
                       safety_of(p), p.get("background"), p.get("quiet", False))


def preview_every(p: dict) -> Optional[int]:
    """--preview-every; on the command line only with --preview (a preset's applies when a run previews)."""
    given = given_by("preview_every") is ParameterSource.COMMANDLINE
    if given and p["preview"] is None:
        raise UsageError(f"--preview-every {p['preview_every']} needs --preview FILE, the file to write them to")
    return p["preview_every"]


def shortcuts_of(p: dict) -> tuple[float, float, Optional[float], bool]:
    """--reuse, --cfg-until and --shift, off when not given (None: so a chain's command line overrides only what
    it gives), and the KV cache (off with --no-kv-cache, where a command has it)."""
    return 0.0 if p["reuse"] is None else p["reuse"], 1.0 if p["cfg_until"] is None else p["cfg_until"], p["shift"], \
        not p.get("no_kv_cache", False)


def edit_job(shape, p: dict) -> spec.Inpaint:
    """inpaint's and outpaint's job: the mask's options in `shape`, the rest from the command's parameters."""
    part = shard_of(p)
    return spec.Inpaint(tuple(p["images"]), shape, spec.Prompt(p["prompt"], p["negative_prompt"], p["steps"], p["cfg"],
                                                            p["seed"], *shortcuts_of(p)),
                     p["strength"], p["attn_mask"], p["context"], output_of(p), p["out_dir"], p["skip_existing"],
                     model_of(p, part), cache_of(p), p["preset"], part)


def words_of(p: dict) -> Optional[spec.WordMask]:
    """--mask-prompt, --mask-model and --mask-threshold as a spec.WordMask (None: no --mask-prompt); the device
    is the command's."""
    if not p["mask_prompt"]:
        return None
    return spec.WordMask(tuple(p["mask_prompt"]), p["mask_model"], p["mask_threshold"], p["device"])


def shard_of(p: dict):
    """--shard as a shard.Shard (None: the whole batch)."""
    from qimg.jobs import shard

    return shard.parse(p["shard"]) if p["shard"] is not None else None


def ray_of(p: dict) -> Optional[spec.RaySpec]:
    """--ray, --ray-workers and --retries as a spec.RaySpec (None: no Ray)."""
    if p["ray"] is None:
        for name in ("ray_workers", "retries"):
            if p[name] != {"ray_workers": None, "retries": RAY_RETRIES}[name]:
                origin = f" (given here or by preset {p['preset']})" if p.get("preset") else ""
                raise UsageError(f"--{name.replace('_', '-')}{origin} goes with --ray ADDRESS")
        return None
    return spec.RaySpec(p["ray"], p["ray_workers"], p["retries"])


def working_folder() -> None:
    """Refuse a run from a working folder that was deleted, before anything relies on it (relative paths, the
    worker's message, torch's libraries, which die with a raw line when the folder is gone)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise UsageError("the working folder was deleted (or moved away); cd to a folder that exists and run "
                         "again") from None


# --- The safety filter under the operator's rules (docs/safety.md) ----------------------------------------------

CHECKS = {"off": set(), "prompt": {"prompt"}, "image": {"image"}, "both": {"prompt", "image"}}


def safety_of(p: dict) -> spec.Safety:
    """--safety and its options as a spec.Safety. $QIMG_SAFETY (the operator's, for every command on the machine,
    and every job a worker runs: the caller's environment is the job's) is a floor: a preset adds to it and never
    lowers it (nor brings its own classifier or raises the threshold), and a command line that would do any of
    these is refused unless QIMG_SAFETY_ALLOW_OFF=1/true/yes (which lets the command line through, never a preset).
    $QIMG_SAFETY_WORDS applies beside --safety-words."""
    from typer._click.globals import get_current_context

    floor = os.environ.get("QIMG_SAFETY", "").strip().lower()
    if floor not in ("", *SAFETY):
        raise UsageError(f"QIMG_SAFETY={floor[:20]!r} is not one of {', '.join(SAFETY)}")
    floor = floor or "off"
    allow_off = os.environ.get("QIMG_SAFETY_ALLOW_OFF", "").strip().lower()
    if allow_off not in ("", "1", "true", "yes"):
        raise UsageError(f"QIMG_SAFETY_ALLOW_OFF={allow_off[:20]!r}: set it to 1 (or true, yes) to allow a "
                         "command line to check less, or unset it")
    allow_off = bool(allow_off)
    operator = floor != "off" and not allow_off  # the command line may not check less either
    asked, by = p["safety"], given_by("safety")
    if asked is None:
        check = floor
    elif by is ParameterSource.COMMANDLINE and operator and not CHECKS[asked] >= CHECKS[floor]:
        raise UsageError(f"--safety {asked}: QIMG_SAFETY={floor} is set for every run here, and a command cannot "
                         "check less (its operator can allow it with QIMG_SAFETY_ALLOW_OFF=1)")
    else:  # a command line's (allowed) decides; a preset's only adds to the operator's floor
        added = CHECKS[asked] if by is ParameterSource.COMMANDLINE else CHECKS[asked] | CHECKS[floor]
        check = next(k for k, v in CHECKS.items() if v == added)
    if floor != "off":
        operators_own(p, allow_off)
    for name, part in (("safety_words", "prompt"), ("safety_prompt_classifier", "prompt"), ("safety_classifier",
                                                                                             "image")):
        if p[name] is not None and given_by(name) is ParameterSource.COMMANDLINE and part not in CHECKS[check]:
            warnings.warn(f"--{name.replace('_', '-')} does nothing unless --safety is {part} or both (it is "
                          f"{check})", QimgWarning)
    env_words = os.environ.get("QIMG_SAFETY_WORDS", "").strip()
    words = tuple(dict.fromkeys(Path(w) for w in (env_words, p["safety_words"]) if w))
    debug = bool(get_current_context().find_root().params.get("debug"))
    return spec.Safety(check, words, p["safety_prompt_classifier"], p["safety_classifier"], p["safety_threshold"],
                       p["safety_action"], debug)


def operators_own(p: dict, allow_off: bool) -> None:
    """Under $QIMG_SAFETY, the classifiers are the operator's (their environment variables) and the threshold
    may only be lowered: by a preset always, by the command line unless QIMG_SAFETY_ALLOW_OFF."""
    caller = (ParameterSource.DEFAULT_MAP,) + (() if allow_off else (ParameterSource.COMMANDLINE,))
    for name in ("safety_classifier", "safety_prompt_classifier"):
        if p[name] is not None and given_by(name) in caller:
            option = "--" + name.replace("_", "-")
            raise UsageError(f"{option}: QIMG_SAFETY is set for every run here, and the classifiers are its "
                             f"operator's (QIMG_{name.upper()}); leave {option} out")
    try:
        ceiling = float(os.environ.get("QIMG_SAFETY_THRESHOLD", SAFETY_THRESHOLD))
    except ValueError:
        ceiling = SAFETY_THRESHOLD
    if given_by("safety_threshold") in caller and p["safety_threshold"] > ceiling:
        raise UsageError(f"--safety-threshold {p['safety_threshold']:g}: QIMG_SAFETY is set for every run here, "
                         f"and the threshold may only be lowered from {ceiling:g}")
