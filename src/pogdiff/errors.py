"""Errors that tell the user what is wrong with their input and how to fix it."""


class PogdiffError(Exception):
    """A user-facing problem: the CLI prints its message on one line, without a traceback."""

    exit_code = 2


class Interrupted(PogdiffError):
    """Ctrl-C while a run folder was being written: the message says how to continue the run."""

    exit_code = 130  # 128 + SIGINT, as a shell reports a command that Ctrl-C ended


class DatasetError(PogdiffError):
    """The dataset folder, its metadata or one of its images cannot be used as given."""


class PogdiffWarning(UserWarning):
    """Input that works but may not do what the user meant: the CLI prints it once, on one line."""


def first_line(error: BaseException) -> str:
    """A library's error message cut to its first line (or the error's type, when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
