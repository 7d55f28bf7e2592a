"""The one exception type the CLI turns into a single line on stderr and an exit code."""

USAGE = 2  # bad options or input files: the user can fix the command line
RUNTIME = 1  # the command was valid but the work failed


class QimgError(Exception):
    def __init__(self, message: str, code: int = RUNTIME):
        super().__init__(message)
        self.code = code


class UsageError(QimgError):
    def __init__(self, message: str):
        super().__init__(message, USAGE)
