"""The hand-off every job command ends with: the job to the runner (or to Ray's, with --ray), its results reported.

torch is imported only here, by the runner, when a command runs, so `qimg --help` stays instant.
"""

from typing import Optional

from qimg.cli.to_job import working_folder
from qimg.errors import Interrupted
from qimg.jobs import spec
from qimg.jobs.report import Reporter


def execute(job: spec.Job, as_json: bool, ray: Optional[spec.RaySpec] = None) -> None:
    from qimg.jobs import runner

    working_folder()

    with Reporter(as_json) as reporter:
        try:
            if ray is not None:
                from qimg.jobs import ray_runner

                ray_runner.execute(job, ray, reporter)
            else:
                runner.execute(job, reporter)
        except Interrupted as e:
            e.written = reporter.written  # the stop's message names what was finished
            raise
