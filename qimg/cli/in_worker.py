"""The command line as the worker's job process (qimg.worker.runner) runs it: each job is a client's argv, re-run
through `app.run` exactly as `qimg` runs it in-process, with the engine kept between jobs (jobs/kept_engine.py).
The worker sees only argv, file descriptors and exit codes, never a job object."""

from qimg.jobs import kept_engine


def prepare() -> None:
    """Import the command line, torch and the model code now (the first job should not pay for them), and keep
    the engine a job loads for the next one."""
    import qimg.cli.app  # noqa: F401
    import qimg.engine.engine  # noqa: F401

    kept_engine.enabled = True


def run(argv: list[str]) -> int:
    """One job: the exit code `qimg argv` gives in-process."""
    from qimg.cli.app import run

    return run(argv)


def loaded() -> dict | None:
    """The model kept from the last job (an engine, or a segmentation model: `mask_model`), for `qimg worker
    status`: None when none is."""
    return kept_engine.summary()
