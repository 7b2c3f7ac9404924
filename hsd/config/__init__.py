"""Structured configs: dataclasses hold every default; YAML files and key=value overrides change them.

An experiment YAML may name a `base:` YAML (relative to itself) whose overrides it extends. Unknown keys
are refused with the nearest known key suggested, a value of the wrong type with the file, line and key
that hold it; the resolved config is saved in the run folder.

Every numeric field states its allowed range in its metadata (`ge`, `gt`, `within`; `one_of` for a few
strings: `schema.py`), checked by one walker (`rules.check_fields`) that descends into nested dataclasses, lists
of them (tscd.stages.N) and mappings of them (feedback.rewards.NAME); rules that tie fields together follow in
`validate.py`, and last the named world's own rules (`worlds.py`). `loading.py` reads YAML and overrides.
"""
from __future__ import annotations

from ..errors import ConfigError
from .loading import config_yaml, load_config, save_config
from .schema import DMD, TSCD, Adversarial, Data, Feedback, Lab, Lora, Model, Reward, Run, Stage, Trainer

__all__ = ["DMD", "TSCD", "Adversarial", "ConfigError", "Data", "Feedback", "Lab", "Lora", "Model", "Reward", "Run",
           "Stage", "Trainer", "config_yaml", "load_config", "save_config"]
