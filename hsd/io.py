"""Atomic file writes: write to a temp sibling, then rename into place, so a crash never leaves a torn file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import HsdError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` (the old one removed after the rename)."""
    import shutil
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class WeightsError(HsdError, ValueError):
    """A weights file that hsd will not unpickle (it could run code) or cannot read."""


# Data-only types that training frameworks' checkpoint metadata pickles (numpy arrays and scalars, mmengine's
# `meta`); `load_weights(..., numpy_metadata=True)` admits them by name, anything else is still refused by name.
NUMPY_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                 "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                 "collections.OrderedDict", "builtins.set"}


def load_weights(path: str | os.PathLike, numpy_metadata: bool = False) -> dict:
    """A state dict from .safetensors, or from a pickle through `torch.load(weights_only=True)`: never code.

    With `numpy_metadata`, the numpy types of NUMPY_GLOBALS are allowed too (they hold data, not code).
    """
    import torch
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    allowed = _numpy_globals(path) if numpy_metadata else []
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # the unpickler's own messages name the refused global, keep them
        raise WeightsError(f"{path} is not a plain tensor checkpoint that loads with weights_only=True "
                         f"({type(e).__name__}: {e}); convert it to safetensors") from e
    return state.get("state_dict", state) if isinstance(state, dict) else state


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
