"""A stage's resume checkpoint that cannot serve (torn, foreign, unreadable): one line naming it and the remedy."""
from __future__ import annotations

from pathlib import Path

from ..errors import HsdError


class ResumeError(HsdError, ValueError):
    """A stage's resume checkpoint that cannot be read or is not one: named, with the way to start the stage afresh."""


def unreadable_checkpoint(path, reason: str) -> ResumeError:
    """The one message for a resume checkpoint that cannot serve: it is left where it is, never deleted."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.bad")
    return ResumeError(f"resume checkpoint {path} cannot be read ({reason}); it was left as it is: move it aside "
                       f"(mv {path} {aside}) to train this stage afresh, or restore a good copy to resume")


META = "meta.pt"  # a folder checkpoint's Lightning part (hsd.lit.sharded)
# What every checkpoint Lightning writes holds; a folder checkpoint's meta.pt has no state_dict (hsd.lit.sharded).
LIGHTNING_KEYS = ("pytorch-lightning_version", "loops", "global_step")


def check_resumable(path) -> None:
    """The cheap checks, made before a Trainer is built: a checkpoint file is a whole zip (torch.save has written zip
    files since 1.6, and a torn one lacks its central directory at the end), a folder checkpoint has its meta.pt."""
    import zipfile
    path = Path(path)
    if path.is_dir() and not (path / META).is_file():
        raise unreadable_checkpoint(path, f"a folder checkpoint without its {META}")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise unreadable_checkpoint(path, f"not a whole torch checkpoint: torn or foreign, {path.stat().st_size} bytes")
