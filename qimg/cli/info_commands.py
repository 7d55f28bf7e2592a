"""`qimg presets` and `qimg info`: commands that print what a file holds and run no job."""

from pathlib import Path
from typing import Annotated

import typer

from qimg.cli import presets
from qimg.cli.options import JsonOpt
from qimg.jobs.report import json_line, print_result


def list_presets(ctx: typer.Context):
    """List the bundled presets: the commands each fits, its file and its contents."""
    for name, path in presets.bundled().items():
        fits = presets.fitting_commands(ctx.parent.command, presets.read_yaml(path, "preset"))
        print_result(f"{name}  ({', '.join(fits) or 'no command'})  {path}")
        print_result("".join(f"    {line}\n" for line in path.read_text().splitlines()))


def info(
    image: Annotated[Path, typer.Argument(help="An image qimg wrote, a LoRA .safetensors file, or a model part's "
                                          "file (transformer, text encoder, VAE, vision tower).",
                                          show_default=False)], json_: JsonOpt = False,
):
    """Print the parameters that made an image (stored in its PNG text chunk), a LoRA's format, rank, alpha
    and the layers it targets, or which part a weights file is, its format and widths."""
    from qimg.jobs.metadata import describe
    from qimg.jobs.runner import file_info

    params = file_info(image)
    print_result(json_line(params) if json_ else describe(params))
