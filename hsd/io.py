"""Files hsd writes and reads on a user's behalf.

- Atomic writes: into a temp sibling, renamed into place, so a crash never leaves a torn file or folder. The temp
  names carry TEMP_MARK, which is how the next run that owns the folder finds and removes what a killed one left
  (`remove_stale_temps`), and only that. A write that fails (disk full, I/O error) leaves the previous file whole and
  says so in one line (`WriteError`).
- Paths a user gives are checked where they enter (`check_input`, `check_output`): one line naming the path and
  what is wrong with it, before any work starts.
- Weights: from .safetensors, or a pickle through `torch.load(weights_only=True)`: never code.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import HsdError, MissingFileError, PathError

log = logging.getLogger("hsd.io")

TEMP_MARK = ".hsd-tmp-"  # .<name>.hsd-tmp-<random>: an unfinished write of <name>
_TEMP = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"[A-Za-z0-9_]+$")
_OLD = TEMP_MARK + "old"
OLD_NAME = ".{}" + _OLD  # a replaced folder, moved aside between atomic_dir's two renames: a whole copy, kept


# ---- paths a user gives ----
def check_input(path: str | os.PathLike, what: str, expected: str, kind: str = "file") -> Path:
    """A path to read: it exists, is a `kind` ("file" | "folder"), and may be read. `what` names it for the user
    ("LoRA file", "model.vae"), `expected` says what belongs there."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path} (expected {expected})")
    if kind == "file" and path.is_dir():
        raise PathError(f"{what} {path} is a folder, not a file (expected {expected})")
    if kind == "folder" and not path.is_dir():
        raise PathError(f"{what} {path} is a file, not a folder (expected {expected})")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise PathError(f"{what} {path} cannot be read: permission denied")
    return path


def check_output(path: str | os.PathLike, what: str, kind: str = "folder", replaces: str = "") -> Path:
    """A path to write (a `kind`, "file" | "folder", created if absent): if it exists it is one, and otherwise its
    nearest existing parent is a folder that may be written in. `replaces`: the folder is written whole (atomic_dir),
    so an existing one must be empty or hold this file (it is then an earlier copy of what is being written)."""
    path = Path(path)
    if path.exists():
        if (kind == "folder") != path.is_dir():
            other = "a folder" if path.is_dir() else "a file"
            raise PathError(f"{what} {path} is {other}, not a {kind}")
        if replaces and any(path.iterdir()) and not (path / replaces).exists():
            raise PathError(f"{what} {path} holds other files (no {replaces}), and it would be replaced whole: give "
                            f"a new or empty folder")
        writable = path if kind == "folder" else path.parent
    else:
        writable = next(p for p in path.parents if p.exists())
        if not writable.is_dir():
            raise PathError(f"{what} {path} cannot be created: {writable} is a file, not a folder")
    if not os.access(writable, os.W_OK | os.X_OK):
        raise PathError(f"{what} {path} cannot be written: permission denied in {writable}")
    return path


# ---- atomic writes ----
class WriteError(HsdError, OSError):
    """A file or folder that could not be written (no space, an I/O error, no permission); the old one is kept."""

    def __str__(self) -> str:  # OSError would format its args as a tuple
        return str(self.args[0])


def os_reason(error: BaseException) -> str:
    """The operating system's words for a failed read or write (strerror), also from safetensors' Rust errors."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    found = re.search(r'message: "([^"]+)"', str(error))  # safetensors: IoError(Os { code: 28, ..., message: ".." })
    return found.group(1) if found else (str(error).strip().splitlines() or [type(error).__name__])[0]


def _write_failed(path: Path, error: BaseException) -> WriteError:
    kept = "the previous one is kept" if path.exists() else "nothing was written there"
    return WriteError(f"could not write {path}: {os_reason(error)}; {kept}")


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError from Python's files, SafetensorError from safetensors' own writer."""
    from safetensors import SafetensorError
    return OSError, SafetensorError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed and `path` is kept."""
    path = Path(path)
    make_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); the file keeps the user's usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    except HsdError:
        raise
    except _write_errors() as e:
        raise _write_failed(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path`. A folder cannot be swapped in one rename:
    the old one is moved aside (.<name>.hsd-tmp-old), the new one renamed in, then the old one removed; a crash
    between the two renames leaves the old one aside, where `remove_stale_temps` keeps it (a resume reads it:
    hsd.lit.trainer.last_checkpoint) and the next write of `path` removes it."""
    path = Path(path)
    make_parent(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}"))  # random suffix: 8 characters
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = path.with_name(OLD_NAME.format(path.name))
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)  # left by an earlier crash after its second rename
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except HsdError:
        raise
    except _write_errors() as e:
        raise _write_failed(path, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_parent(path: Path) -> None:
    """Create the folder `path` goes into; one line if a user's path cannot hold it (a file in the way, no access)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in path.parents if p.exists()), path.parent)
        raise WriteError(f"cannot create the folder {path.parent} for {path.name}: {blocker} is a file, not a "
                         f"folder") from None
    except OSError as e:
        raise WriteError(f"cannot create the folder {path.parent} for {path.name}: {os_reason(e)}") from e


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders that killed writes left under `folder` (only names with TEMP_MARK, and
    not inside another such temp); returns what was removed. A folder that `atomic_dir` moved aside (OLD_NAME) is a
    whole earlier copy and is kept. Call it from the one process that owns the folder, before it writes."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            if _TEMP.match(name) and not name.endswith(_OLD):
                p = Path(root) / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
        dirs[:] = [d for d in dirs if not _TEMP.match(d)]
    if removed:
        log.warning("removed %d unfinished write(s) that an interrupted run left in %s, e.g. %s", len(removed), folder,
                    removed[0].name)
    return removed


def is_main_process() -> bool:
    """Rank 0 of a run, before torch.distributed starts (the launchers set these variables in every other one)."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class WeightsError(HsdError, ValueError):
    """A weights file that hsd will not unpickle (it could run code) or cannot read."""


# Data-only types that training frameworks' checkpoint metadata pickles (numpy arrays and scalars, mmengine's
# `meta`); `load_weights(..., numpy_metadata=True)` admits them by name, anything else is still refused by name.
NUMPY_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                 "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                 "collections.OrderedDict", "builtins.set"}


def read_safetensors(path: str | os.PathLike, error: type[HsdError] = WeightsError) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; a truncated or foreign file is one line naming it (`error`)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise error(f"{path} is not a readable safetensors file ({os_reason(e)})") from e


def load_weights(path: str | os.PathLike, numpy_metadata: bool = False) -> dict:
    """A state dict from .safetensors, or from a pickle through `torch.load(weights_only=True)`: never code.

    With `numpy_metadata`, the numpy types of NUMPY_GLOBALS are allowed too (they hold data, not code).
    """
    import torch
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    allowed = _numpy_globals(path) if numpy_metadata else []
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # the unpickler's own messages name the refused global, keep them
        raise WeightsError(f"{path} is not a plain tensor checkpoint that loads with weights_only=True "
                           f"({type(e).__name__}: {_first_line(e)}); convert it to safetensors") from e
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _numpy_globals(path: Path) -> list:
    import importlib

    import torch
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    unknown = needed - NUMPY_GLOBALS
    if unknown:
        raise WeightsError(f"{path} pickles types that are not plain data: {sorted(unknown)}; "
                         f"save its 'state_dict' as .safetensors instead")
    allowed = [getattr(importlib.import_module(g.rsplit(".", 1)[0]), g.rsplit(".", 1)[1]) for g in needed]
    if needed:   # a numpy dtype's class is pickled inside it without being listed
        import numpy as np
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed
