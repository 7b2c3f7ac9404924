"""The worlds a run trains in, built by name: the lab (exact metrics) and SD1.5 / SDXL (the user's weights).

Each world is one module behind the `World` protocol (hsd.worlds.base); `hsd.train` drives any of them the same
way, and `hsd.config` asks the named world to check the settings it alone knows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Artefacts, World
from .lab import Lab
from .sd import SD

if TYPE_CHECKING:
    from ..config import Run

WORLDS: dict[str, type] = {"lab": Lab, "sd15": SD, "sdxl": SD}

__all__ = ["WORLDS", "Artefacts", "Lab", "SD", "World", "build_world", "check_world"]


def check_world(run: Run) -> None:
    if run.world not in WORLDS:
        raise ConfigError(f"world must be one of {', '.join(WORLDS)}, got {run.world!r}")
    WORLDS[run.world].check(run)


def build_world(run: Run) -> World:
    return WORLDS[run.world](run)
