"""The names a config, the CLI and the registries all read: one torch-free list of each (a leaf module).

WORLDS maps each `world:` name to the world module that builds it (`hsd.worlds.CLASSES`); LAB_WORLDS maps each
`lab.world:` name to its diffusion family (hsd.diffusion.schedule.FAMILIES): the mixture it draws from is the name
before any "-flow" suffix (`hsd.lab.world.lab_world`), its teacher is the shipped folder of that name.
"""
from __future__ import annotations

WORLDS = {"lab": "lab", "sd15": "sd", "sdxl": "sd", "sd3": "sd", "flux": "sd"}
DIT_WORLDS = ("sd3", "flux")  # flow-matching transformers from local folders (hsd.models.dit): SD3 / SD3.5, FLUX.1
LAB_WORLDS = {"digits": "vp", "blocks": "vp", "digits-flow": "flow"}
DEFAULT_LAB_WORLD = "digits"
QUANTIZE_MODES = ("none", "int8", "fp8", "nf4")  # model.quantize: the frozen base, weight-only (hsd.models.quantize)
