"""The one error type for user mistakes.

Scripts catch `UserError`, print its message as a single line on stderr and exit 2;
anything else is a bug and keeps its traceback. It subclasses ValueError so library
callers that expect ValueError for bad arguments keep working.
"""


class UserError(ValueError):
    """A bad value supplied by the user; the message names the value and the fix."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; exit with 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
