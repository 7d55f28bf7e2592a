"""How a job tells the user what happens: progress bars on a terminal, one result line (or JSON object) per
output, skipped and failed files, the files written so far. The job runner reports only through this, so a
command run in-process and one run by the worker print the same lines."""

import json
import os
import sys
import time
from pathlib import Path

from qimg.errors import QimgError, Withheld, say


def json_line(obj) -> str:
    """One line of JSON for stdout: non-ASCII kept where stdout can encode it, else escaped (LANG=C, a lone
    surrogate), so the line is valid JSON either way."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode(sys.stdout.encoding or "utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj)
    return text


def print_result(text: str) -> None:
    """Results go to stdout. If its reader has gone (`qimg ... --json | head -n1`), the rest are dropped
    and the run goes on: every output is still written, and errors and the summary still go to stderr. Text
    stdout's encoding cannot hold (`qimg info` of a Chinese prompt under PYTHONIOENCODING=ascii) is escaped;
    a stdout that cannot be written at all (a full disk) stops the run with one line."""
    encoding = sys.stdout.encoding or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = text.encode(encoding, "backslashreplace").decode(encoding)
    try:
        sys.stdout.write(text + "\n")  # one write: the lines of processes sharing a stdout (torchrun's) never mix
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_null()
    except OSError as e:
        _stdout_to_null()
        raise QimgError(f"cannot write to stdout: {e.strerror or e}") from None


def _stdout_to_null() -> None:
    """So later prints and the flush at exit go nowhere instead of failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class Reporter:
    def __init__(self, as_json: bool = False):
        self.as_json = as_json
        self.written: list[Path] = []  # files saved, in order: an interrupted run names them
        self._progress = None

    def __enter__(self):
        """Rich progress bars on stderr, drawn only on a terminal, for as long as the job runs."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=True,
            disable=not console.is_terminal,
        )
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)
        self._progress = None

    def bar(self, label: str, total: int):
        """A bar for a loop of `total` items (it goes with the reporter): advance(), which moves it one on."""
        task = self._progress.add_task(label, total=total, rate="")
        return lambda: self._progress.advance(task)

    def steps(self, label: str, total: int):
        """A bar for one sampling run: (the sampler's per-step callback, done())."""
        task = self._progress.add_task(label, total=total, rate="")
        started = time.perf_counter()

        def callback(i, _x):
            rate = (i + 1) / (time.perf_counter() - started)
            self._progress.update(task, completed=i + 1,
                                  rate=f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it")

        return callback, lambda: self._progress.remove_task(task)

    def saved(self, out: Path) -> None:
        self.written.append(out)

    def result(self, out: Path, params: dict, started: float) -> None:
        seconds = round(time.perf_counter() - started, 3)
        if self.as_json:
            print_result(json_line({"output": str(out), **params, "seconds": seconds}))
        else:
            say(f"{out}  seed {params['seed']}  {params['width']}x{params['height']}  {seconds:.1f} s")

    def skipped(self, image: Path, out: Path) -> None:
        if self.as_json:
            print_result(json_line({"input": str(image), "output": str(out), "skipped": True}))
        else:
            say(f"{out}  exists, skipped")

    def failed(self, image: Path, error: QimgError) -> None:
        """A batch file that failed while the others go on."""
        message = str(error) if str(image) in str(error) else f"{image}: {error}"
        if self.as_json:
            print_result(json_line({"input": str(image), "error": message}))
        say(f"qimg: error: {message}")

    def withheld(self, item, error: Withheld, line: bool = True) -> None:
        """An item the safety filter held back (jobs/safety.py): its JSON object on stdout with --json, and (a
        batch's, which goes on) its line on stderr; a single run's line is its error's."""
        message = str(error) if str(item) in str(error) else f"{item}: {error}"
        if self.as_json:
            print_result(json_line({"input": str(item), "withheld": True, "safety": error.record}))
        if line:
            say(f"qimg: safety: {message}")
