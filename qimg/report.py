"""How a job tells the user what happens: progress bars on a terminal, one result line (or JSON object) per
output, skipped and failed files, the files written so far. The job runner reports only through this, so a
command run in-process and one run by the worker print the same lines."""

import json
import sys
import time
from pathlib import Path

from .errors import QimgError


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
        """A bar for a loop of `total` items: (advance(), done()); advance() moves it one item on."""
        task = self._progress.add_task(label, total=total, rate="")
        return (lambda: self._progress.advance(task)), (lambda: self._progress.remove_task(task))

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
            print(json.dumps({"output": str(out), **params, "seconds": seconds}, ensure_ascii=False))
        else:
            print(f"{out}  seed {params['seed']}  {params['width']}x{params['height']}  {seconds:.1f} s",
                  file=sys.stderr)

    def skipped(self, image: Path, out: Path) -> None:
        if self.as_json:
            print(json.dumps({"input": str(image), "output": str(out), "skipped": True}, ensure_ascii=False))
        else:
            print(f"{out}  exists, skipped", file=sys.stderr)

    def failed(self, image: Path, error: QimgError) -> None:
        """A batch file that failed while the others go on."""
        message = str(error) if str(image) in str(error) else f"{image}: {error}"
        if self.as_json:
            print(json.dumps({"input": str(image), "error": message}, ensure_ascii=False))
        print(f"qimg: error: {message}", file=sys.stderr)
