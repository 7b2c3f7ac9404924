"""The one base of every user error, and the one place that turns it into a line for the user.

A user error (a bad config key or value, a missing, corrupt or foreign file) is raised as an `HsdError` subclass
whose message names the file, key or value and what is expected. The CLIs print that one line and exit with status 2;
`--debug` or HSD_DEBUG=1 shows the traceback instead. An operating-system error at a path (`OSError` with a file
name: no permission, no space, a file where a folder must be) is the user's world too and reads the same way, naming
the path; Ctrl-C ends in one `hsd: interrupted:` line (status 130). Anything else is a bug and keeps its traceback.
Subclasses also derive from the builtin they refine (ValueError, FileNotFoundError), so callers that catch
those keep working.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

USAGE = 2  # the exit status of a user error (argparse uses it for bad arguments too)
SIGINT_STATUS = 130  # the shells' status for a command stopped by Ctrl-C (128 + SIGINT)
SIGTERM_STATUS = 143  # and by SIGTERM (128 + SIGTERM): kill, a scheduler's preemption or time limit


class HsdError(Exception):
    """A user error: its message is one line naming the cause and what is expected."""


class ConfigError(HsdError, ValueError):
    """A config file, key or value that cannot describe a run."""


class MissingFileError(HsdError, FileNotFoundError):
    """A file or folder the user named (or a default one) does not exist."""


class MissingPackageError(HsdError, ImportError):
    """An optional package that a chosen setting needs is not installed; the message says how to install it."""


class PathError(HsdError, OSError):
    """A user's path that cannot serve as given: missing, a file where a folder is needed, unreadable, unwritable."""

    def __str__(self) -> str:  # OSError would format its args as a tuple
        return str(self.args[0])


class Interrupted(HsdError):
    """Ctrl-C (or SIGTERM, with `status` SIGTERM_STATUS): the message says what was kept and how to go on."""
    word = "interrupted"

    def __init__(self, message: str, status: int = SIGINT_STATUS):
        super().__init__(message)
        self.status = status


def os_error_line(error: OSError) -> str:
    """One line for an OSError at a path: the path(s) and the operating system's reason."""
    where = f"{error.filename} -> {error.filename2}" if error.filename2 else str(error.filename)
    return f"{where}: {error.strerror or type(error).__name__}"


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("HSD_DEBUG", "") not in ("", "0")


class UserExit(SystemExit):
    """Exit status 2 (130 after Ctrl-C) that still reads as the line the user was shown (for callers and tests that
    catch it)."""

    def __init__(self, line: str, status: int = USAGE):
        super().__init__(status)
        self.line = line

    def __str__(self) -> str:
        return self.line


def fail(prog: str, error: BaseException) -> NoReturn:
    """Print `prog: error: <first line>` (or `prog: interrupted: ...`) to stderr and exit with status 2 (130)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = f"{prog}: {getattr(error, 'word', 'error')}: {first}"
    print(line, file=sys.stderr, flush=True)
    raise UserExit(line, getattr(error, "status", USAGE))


def run_guarded(fn: Callable[[], object], prog: str, debug: bool = False) -> object:
    """Run a command: a user error, an OS error at a path or Ctrl-C becomes one line unless debugging."""
    try:
        return fn()
    except HsdError as e:
        if debug_enabled(debug):
            raise
        fail(prog, e)
    except OSError as e:  # only errors that name a path: anything else is a bug and keeps its traceback
        if debug_enabled(debug) or e.filename is None:
            raise
        fail(prog, PathError(os_error_line(e)))
    except KeyboardInterrupt:
        if debug_enabled(debug):
            raise
        fail(prog, Interrupted("stopped by Ctrl-C; every file hsd wrote is complete (it writes atomically): rerun "
                               "the same command to go on from them"))
