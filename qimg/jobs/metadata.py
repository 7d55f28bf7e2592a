"""What made an image: its parameters as JSON in the PNG `qimg` text chunk, written with every output and read
back by `qimg info`. Metadata from a file is data: parsed with json.loads, printed with control characters
escaped, never evaluated."""

import json
import math
from pathlib import Path

from qimg import __version__
from qimg.errors import QimgError, printable
from qimg.images import read_image

CHUNK = "qimg"


def output_params(command: str, engine, preset: str | None, lineage: list | None = None, **fields) -> dict:
    """Every output's parameters, one shape for all commands: the command, what it ran with (`fields`), the
    model (path and fingerprint), the --preset it took options from (None: none) and, for `qimg chain`, its
    lineage: one entry per edit that led to it (empty for a single command). loras: each LoRA fused into the
    model (file name, sha256, scale, format). When the transformer's weights came from a --transformer file or
    --quantize, `transformer`: the file's name, sha256 and format."""
    source = {"transformer": engine.transformer_info} if engine.transformer_info else {}
    return dict(command=command, **fields, model=str(engine.folder), model_fingerprint=engine.model_fingerprint,
                **source, loras=[one.record() for one in engine.loras], preset=preset, lineage=list(lineage or []))


def png_text(params: dict) -> dict[str, str]:
    """The text chunks `files.save_image` writes for an output made with `params`."""
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
