"""Atomic file writes: write to a temp sibling, then rename into place, so a crash never leaves a torn file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


def load_weights(path: str | os.PathLike) -> dict:
    """A state dict from .safetensors, or from a pickle through `torch.load(weights_only=True)`: never code."""
    import torch
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # the unpickler's own messages name the refused global, keep them
        raise ValueError(f"{path} is not a plain tensor checkpoint that loads with weights_only=True "
                         f"({type(e).__name__}: {e}); convert it to safetensors") from e
    return state.get("state_dict", state) if isinstance(state, dict) else state
