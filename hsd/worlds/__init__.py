"""The worlds a run trains in, built by name: the lab (exact metrics) and SD1.5 / SDXL (the user's weights).

Each world is one module behind the `World` protocol (hsd.worlds.base); `hsd.train` drives any of them the same
way. The names live in hsd.names (torch-free, read by the config and the CLI too); each world's config rules live
in hsd.config.worlds, so the config never imports a world module.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..names import WORLDS
from .base import Artefacts, World
from .lab import Lab
from .sd import SD

if TYPE_CHECKING:
    from ..config import Run

CLASSES: dict[str, type] = {"lab": Lab, "sd": SD}  # the modules hsd.names.WORLDS points at

__all__ = ["CLASSES", "Artefacts", "Lab", "SD", "World", "build_world"]


def build_world(run: Run) -> World:
    return CLASSES[WORLDS[run.world]](run)
