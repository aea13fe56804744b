"""The one family of errors guie raises on purpose.

Every error the library raises for a reason the user can act on (a bad file, option, recipe, index, request) is a
`GuieError`: its `str()` is one line that names the input and, where there is one, the fix. The CLI has one boundary
(`guie.cli.main`) that prints such an error as `error: <message>` and exits 2; anything else is a bug in guie and
keeps its traceback (exit 1). Library messages never name CLI flags: they name the setting, the file or the value.

The subclasses that also derive from a builtin (`ValueError`, `FileNotFoundError`, `RuntimeError`) keep code that
catches the builtin working; new code catches `GuieError`.
"""
from __future__ import annotations


class GuieError(Exception):
    """Base of every error guie raises on purpose; `str()` is a one-line message naming the input.

    `exit_code` is what the CLI exits with (2: bad input, as click's own usage errors).
    """

    exit_code: int = 2


class InputError(GuieError, ValueError):
    """A value, option, file content or request that cannot be used as given."""


class MissingFileError(GuieError, FileNotFoundError):
    """A file or folder the user named does not exist."""

    def __init__(self, path, what: str = "file") -> None:
        super().__init__(f"{path}: {what} not found")
        self.filename = str(path)

    def __str__(self) -> str:
        return str(self.args[0])  # OSError's own would print "[Errno None] None: '<path>'" once filename is set


class EnvironmentProblem(GuieError, RuntimeError):
    """The machine lacks something guie needs (a program, a library, disk space, a device): the message says what."""
