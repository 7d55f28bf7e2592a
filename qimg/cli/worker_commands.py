"""`qimg worker start | status | stop`: the Typer commands, added to the CLI as a sub-app."""

from typing import Annotated

import typer

from qimg.errors import QimgError, UsageError, say
from qimg.jobs.report import json_line, print_result
from qimg.worker import client, paths

app = typer.Typer(no_args_is_help=True, help="A background worker that keeps the model loaded between commands.")


@app.command()
def start(idle: Annotated[float, typer.Option(min=1, help="Exit after this many seconds without jobs.")]
          = client.DEFAULT_IDLE):
    """Start the worker (one per user and installation); returns when it is ready."""
    try:
        pid, new = client.start(idle)
    except paths.Insecure as e:
        raise UsageError(str(e)) from None
    except client.WorkerError as e:
        raise QimgError(str(e)) from None
    state = f"started (idle exit after {idle:g} s)" if new else "already running"
    say(f"qimg worker {state}: pid {pid}, log {paths.log_path()}")


@app.command()
def status(json_: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False):
    """Show the running worker: pid, uptime, loaded model, jobs run, memory, socket, log. Exit 1 when none runs."""
    answer = ask({"op": "status"})
    if json_:
        print_result(json_line({"running": answer is not None, **(answer or {})}))
    if answer is None:
        if not json_:
            say("qimg: no worker running")
        raise typer.Exit(1)
    if not json_:
        loaded = answer["loaded"]
        model = (f"{loaded['model']} ({loaded['device']}, {loaded['dtype']}, offload {loaded['offload']})"
                 if loaded and "model" in loaded else "none")
        if loaded and "mask_model" in loaded:
            model = f"{loaded['mask_model']} (mask model, {loaded['device']})"
        for name, value in (("pid", answer["pid"]), ("uptime", f"{answer['uptime']:.0f} s"), ("model", model),
                            ("jobs run", answer["jobs_run"]), ("busy", "running a job" if answer["busy"] else "no"),
                            ("queued", answer["queued"]), ("memory", f"{answer['memory'] / 2**20:.0f} MiB"),
                            ("idle exit", f"{answer['idle_exit']:g} s"), ("socket", answer["socket"]),
                            ("log", answer["log"])):
            print_result(f"{name + ':':<11}{value}")


@app.command()
def stop():
    """Stop the worker after its current and queued jobs; new commands run in-process at once."""
    answer = ask({"op": "stop"})
    say(f"qimg worker (pid {answer['pid']}) stopping" if answer else "qimg: no worker running")


def ask(message: dict) -> dict | None:
    try:
        return client.request(message)
    except paths.Insecure as e:
        raise UsageError(str(e)) from None
