"""The `qimg` command line: parse, resolve options, call the engine, save, report.

torch and the model code are imported inside the commands, so `qimg --help` stays instant.
"""

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import Abort, TyperException

from .errors import QimgError, UsageError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Generate and edit images with Qwen-Image from the shell.",
)

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="QIMG_MODEL", show_envvar=True,
    help="Model folder (diffusers layout) or Hugging Face repo id, e.g. Qwen/Qwen-Image.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on GPUs, float32 on CPU), float32, bfloat16, float16.")]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="What to draw (any language).")]
NegativeOpt = Annotated[Optional[str], typer.Option(help="What to steer away from [default: model's, ' '].")]
SizeOpt = Annotated[Optional[str], typer.Option(help="WIDTHxHEIGHT, multiples of 16 [default: model's].")]
StepsOpt = Annotated[Optional[int], typer.Option(min=1, max=1000, help="Sampling steps [default: model's, 50].")]
CfgOpt = Annotated[Optional[float], typer.Option(min=0.0, max=100.0, help="True CFG scale; <= 1 disables guidance.")]
SeedOpt = Annotated[Optional[int], typer.Option(min=0, max=2**63 - 1, help="Random seed [default: random, reported].")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output image (.png, .jpg, .webp).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object describing the result on stdout.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", envvar="QIMG_DEBUG", help="Show tracebacks.")] = False):
    pass


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size {text!r} is not WIDTHxHEIGHT, e.g. 1024x768") from None
    for name, v in (("width", w), ("height", h)):
        if v <= 0 or v % 16:
            raise UsageError(f"--size {text}: {name} {v} must be a positive multiple of 16")
    return w, h


def open_engine(model: Optional[str], device: str, dtype: str):
    from .engine import Engine
    from .weights import resolve_model

    if not model:
        raise UsageError("no model given: pass --model FOLDER|REPO or set QIMG_MODEL")
    return Engine(resolve_model(model), device, dtype)


def step_progress(total: int, label: str):
    """A rich progress bar on stderr and the sampler callback that advances it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=True,
        disable=not console.is_terminal,
    )
    task = progress.add_task(label, total=total, rate="")
    started = time.perf_counter()

    def callback(i, _x):
        rate = (i + 1) / (time.perf_counter() - started)
        progress.update(task, completed=i + 1, rate=f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")

    return progress, callback


@app.command()
def generate(
    prompt: PromptOpt, negative_prompt: NegativeOpt = None, model: ModelOpt = None, size: SizeOpt = None,
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, out: OutOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", json_: JsonOpt = False,
):
    """Generate an image from a prompt."""
    started = time.perf_counter()
    width, height = parse_size(size) if size else (None, None)
    seed = secrets.randbelow(2**32) if seed is None else seed
    from .files import check_output, default_output, save_image

    out = out or default_output(f"qimg-{seed}")
    check_output(out)
    engine = open_engine(model, device, dtype)
    d = engine.defaults
    width, height = width or d.width, height or d.height
    steps, cfg = steps or d.steps, d.cfg if cfg is None else cfg
    negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
    progress, callback = step_progress(steps, "generating")
    with progress:
        image = engine.generate(prompt, negative_prompt, width, height, steps, cfg, seed, callback)
    params = dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, width=width, height=height,
                  steps=steps, cfg=cfg, model=str(engine.folder))
    save_image(image, out, {"qimg": json.dumps(params, ensure_ascii=False)})
    report(out, params, started, json_)


def report(out: Path, params: dict, started: float, as_json: bool) -> None:
    seconds = round(time.perf_counter() - started, 3)
    if as_json:
        print(json.dumps({"output": str(out), **params, "seconds": seconds}, ensure_ascii=False))
    else:
        print(f"{out}  seed {params['seed']}  {params['width']}x{params['height']}  {seconds:.1f} s", file=sys.stderr)


def run(args: list[str]) -> int:
    """Run the CLI and return its exit code; every failure becomes one line on stderr."""
    debug = "--debug" in args or os.environ.get("QIMG_DEBUG", "") not in ("", "0")
    try:
        code = app(args=args, prog_name="qimg", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except TyperException as e:
        if e.format_message():  # empty after no-args help
            print(f"qimg: error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except Abort:
        print("qimg: interrupted", file=sys.stderr)
        return 130
    except QimgError as e:
        if debug:
            raise
        print(f"qimg: error: {e}", file=sys.stderr)
        return e.code
    except Exception as e:
        if debug:
            raise
        print(f"qimg: error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return 1


def main() -> None:
    sys.exit(run(sys.argv[1:]))
