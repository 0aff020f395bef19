"""Errors that tell the user what is wrong with their input and how to fix it."""


class PogdiffError(Exception):
    """A user-facing problem: the CLI prints its message on one line, without a traceback."""


class DatasetError(PogdiffError):
    """The dataset folder, its metadata or one of its images cannot be used as given."""


class PogdiffWarning(UserWarning):
    """Input that works but may not do what the user meant: the CLI prints it once, on one line."""
