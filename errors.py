"""The project's own error types (off the reading path).

An error the user caused (a flag, a file, a row of their data, a checkpoint that does not
fit) is raised as one of these, with a message that names the flag, file, key or row and says
what to do; `cli.cli` prints it as one line `error: ...`. Anything else is a bug in the code
and shows its full traceback. They subclass the built-in types callers already catch
(ValueError, FileNotFoundError, KeyError), so `except ValueError` keeps working.
"""


class UserError(ValueError):
    """A bad flag, value or input the user can fix; the message says how."""


class DataError(UserError):
    """A data file or row the user supplied is malformed."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks a file it must hold)."""


class DivergedError(UserError, FloatingPointError):
    """The loss or the gradients were not finite for too many steps in a row."""


class CheckpointError(UserError, KeyError):
    """A checkpoint whose keys or shapes do not fit the model, or a damaged checkpoint file."""

    def __str__(self):  # KeyError quotes its message; ours is a sentence
        return str(self.args[0]) if self.args else ""
