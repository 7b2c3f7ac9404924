"""The one base of every user error, and the one place that turns it into a line for the user.

A user error (a bad config key or value, a missing or foreign file) is raised as an `HsdError` subclass whose
message names the file, key or value and what is expected. The CLIs print that one line and exit with status 2;
`--debug` or HSD_DEBUG=1 shows the traceback instead. Anything else is a bug and keeps its traceback.
Subclasses also derive from the builtin they refine (ValueError, FileNotFoundError), so callers that catch
those keep working.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

USAGE = 2  # the exit status of a user error (argparse uses it for bad arguments too)


class HsdError(Exception):
    """A user error: its message is one line naming the cause and what is expected."""


class ConfigError(HsdError, ValueError):
    """A config file, key or value that cannot describe a run."""


class MissingFileError(HsdError, FileNotFoundError):
    """A file or folder the user named (or a default one) does not exist."""


class MissingPackageError(HsdError, ImportError):
    """An optional package that a chosen setting needs is not installed; the message says how to install it."""


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("HSD_DEBUG", "") not in ("", "0")


class UserExit(SystemExit):
    """Exit status 2 that still reads as the line the user was shown (for callers and tests that catch it)."""

    def __init__(self, line: str):
        super().__init__(USAGE)
        self.line = line

    def __str__(self) -> str:
        return self.line


def fail(prog: str, error: BaseException) -> NoReturn:
    """Print `prog: error: <first line>` to stderr and exit with status 2."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = f"{prog}: error: {first}"
    print(line, file=sys.stderr)
    raise UserExit(line)


def run_guarded(fn: Callable[[], object], prog: str, debug: bool = False) -> object:
    """Run a command: a user error becomes one line and exit status 2 unless debugging."""
    try:
        return fn()
    except HsdError as e:
        if debug_enabled(debug):
            raise
        fail(prog, e)
