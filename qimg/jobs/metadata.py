"""What made an image: its parameters as JSON in the PNG `qimg` text chunk, written with every output (as
--metadata says: full, minimal or off) and read back by `qimg info`. Metadata from a file is data: parsed with
json.loads, printed with control characters escaped, never evaluated."""

import json
import math
from pathlib import Path
from typing import NamedTuple, Optional

from qimg import __version__
from qimg.errors import QimgError, printable
from qimg.images import read_image
from qimg.option_values import preset_is_file
from qimg.small_files import sha256_of

CHUNK = "qimg"


class Params(NamedTuple):
    """An output's parameters twice: `report` for --json and the result line (local output: the files by the
    paths given), `stored` for the PNG chunk and the last preview, as --metadata says (None: off)."""

    report: dict
    stored: Optional[dict]


def output_params(command: str, engine, job, lineage: Optional[list] = None, files: Optional[dict] = None,
                  **fields) -> Params:
    """Every output's parameters, one shape for all commands: the command, what it ran with (`fields`), the
    files it was made from (`files`: field -> a path, a list of paths or None: input, mask, refs, chain), the
    model, the --preset it took options from (None: none) and, for `qimg chain`, its lineage: one entry per edit
    that led to it (empty for a single command). loras: each LoRA fused into the model (file name, sha256, scale,
    format). When the transformer's weights came from a --transformer file or --quantize, `transformer`: the
    file's name, sha256 and format. A shared picture names no local folder: the PNG holds each file by name and
    sha256, the model by its repo id or folder name and its fingerprint, a preset file by name and sha256."""
    files = files or {}
    full = job.output.metadata == "full"  # only a full record names files by sha256: hash them only then
    record, preset_of = (file_record, preset_record) if full else (str, lambda preset: preset)
    source = {"transformer": engine.transformer_info} if engine.transformer_info else {}
    if engine.files_info:  # split files: each file's identity, and the variant qimg took them for
        source |= {**engine.files_info, "variant": engine.kind.name}
    public = dict(command=command, **fields, **{k: _each(v, record) for k, v in files.items()},
                  model=model_name(job.model.model, engine.folder), model_fingerprint=engine.model_fingerprint,
                  licence=engine.kind.licence,
                  **source, loras=[one.record() for one in engine.loras], preset=preset_of(job.preset),
                  lineage=[{**entry, "preset": preset_of(entry.get("preset"))} for entry in lineage or []])
    local = {**{k: _each(v, str) for k, v in files.items()}, "model": str(engine.folder), "preset": job.preset,
             **({"placement": engine.placement.as_dict()} if engine.devices else {}),
             **({"parallel": engine.parallel.layout.report()} if engine.parallel is not None else {})}
    return Params({**public, **local}, shown(public, job.output.metadata))


def _each(value, record):
    """record(value) for a path, for each of a list of them; None stays None."""
    if value is None:
        return None
    return [record(v) for v in value] if isinstance(value, (list, tuple)) else record(value)


def file_record(path: Path) -> dict:
    """A file as a shared picture names it: its name and the sha256 of its bytes, never its folder."""
    with open(path, "rb") as f:
        return {"name": Path(path).name, "sha256": sha256_of(f)}


def model_name(given: Optional[str], folder: Path) -> str:
    """The model as a shared picture names it: a repo id as given, a folder by its name, or builtin."""
    if given in (None, "", "builtin"):
        from qimg.weights.shipped import CONFIGS

        return f"{folder.name} (split files)" if folder.resolve().parent == CONFIGS else "builtin"
    return folder.resolve().name if Path(given).expanduser().is_dir() else given


def preset_record(preset: Optional[str]):
    """A bundled preset by its name; a preset file by file_record."""
    if preset is None or not preset_is_file(preset):
        return preset
    return file_record(Path(preset))


# --metadata minimal: what reproduces the image, and of a chain's edits the same.
MINIMAL = ("command", "prompt", "negative_prompt", "seed", "width", "height", "steps", "cfg", "strength", "reuse",
           "cfg_until", "shift", "model", "model_fingerprint")
MINIMAL_EDIT = ("index", "kind", "prompt", "negative_prompt", "seed", "steps", "cfg", "strength", "reuse",
                "cfg_until", "shift")


def shown(params: dict, mode: str) -> Optional[dict]:
    """What --metadata `mode` (option_values.METADATA) keeps of an output's parameters: all (full), what
    reproduces the image (minimal), nothing (off: None, no chunk at all)."""
    if mode == "off":
        return None
    if mode == "full":
        return params
    kept = {k: params[k] for k in (*MINIMAL, "safety") if k in params}  # safety: why an output is blurred or black
    if params.get("lineage"):
        kept["lineage"] = [{k: entry[k] for k in MINIMAL_EDIT if k in entry} for entry in params["lineage"]]
    return kept


def png_text(params: Optional[dict]) -> dict[str, str]:
    """The text chunks `images.save_image` writes for an output made with `params` (None: none)."""
    if params is None:
        return {}
    return {CHUNK: json.dumps({"qimg_version": __version__, **params}, ensure_ascii=False)}


def read_params(path: Path) -> dict:
    """The parameters stored in a qimg output; a QimgError when the file carries none or they are damaged."""
    text = read_image(path).info.get(CHUNK)  # PNG text chunks land in info
    if not isinstance(text, str):
        raise QimgError(f"{path} carries no qimg parameters (only PNG outputs of qimg do, and other programs "
                        "may drop them when they re-save a file)")
    try:
        params = json.loads(text, parse_constant=_not_a_number, parse_float=_finite)
    except ValueError as e:
        raise QimgError(f"{path}: its qimg parameters are not valid JSON ({e})") from None
    except RecursionError:
        raise QimgError(f"{path}: its qimg parameters are nested too deeply to be qimg's") from None
    if not isinstance(params, dict):
        raise QimgError(f"{path}: its qimg parameters are not a JSON object")
    return params


def _not_a_number(name: str):
    raise ValueError(f"{name} is not a number JSON allows")  # json.loads takes NaN and Infinity; qimg never writes them


def _finite(text: str) -> float:
    """A JSON number as a float; one too large for a float (1e400) would print back as Infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large for a number qimg writes")
    return value


def describe(params: dict) -> str:
    """One `name  value` line per parameter, values as JSON (strings quoted), with every control and format
    character escaped, so a crafted prompt cannot move the cursor, recolour or reorder the terminal's text."""
    names = {name: printable(name) for name in params}
    width = max(map(len, names.values()), default=0)
    return "\n".join(f"{names[k].ljust(width)}  {printable(json.dumps(v, ensure_ascii=False))}"
                     for k, v in params.items())
