"""A run's model from its local files (world sd15 | sdxl | sd3 | flux): the whole components, or the denoiser alone
(what a cached run, data.cache, trains with). Shared by hsd.worlds.sd and hsd.data.cache."""
from __future__ import annotations

import torch

from ..names import DIT_WORLDS


def load_world_components(cfg, denoiser=None):
    """The run's model (world sd15 | sdxl | sd3 | flux) from model.path, its family checked, the text encoders in
    model.frozen_dtype; `denoiser`: one already loaded (not read again)."""
    from .components import check_family, load_components
    m = cfg.model
    if cfg.world in DIT_WORLDS:
        from .dit import load_dit
        c = load_dit(m.path, cfg.world, t5=m.t5, transformer=denoiser)
    else:
        c = load_components(m.path, m.vae, m.config, unet=denoiser)
        check_family(c, cfg.world, m.path)
    frozen = getattr(torch, m.frozen_dtype)
    for enc in c.text_encoders:
        enc.to(frozen)
    return c


def load_denoiser(cfg):
    """(the denoiser, the scheduler) alone, its family checked: what a cached run loads to train."""
    from .components import ModelError, family_of
    m = cfg.model
    if cfg.world in DIT_WORLDS:
        from .dit import load_transformer
        return load_transformer(m.path, cfg.world)
    from .components import load_unet
    unet, scheduler = load_unet(m.path, m.config)
    if family_of(unet.config) != cfg.world:
        raise ModelError(f"{m.path} holds {family_of(unet.config).upper()} weights but the run asks for "
                         f"{cfg.world.upper()} (world: {cfg.world}); set world: {family_of(unet.config)} or use "
                         f"{cfg.world.upper()} weights")
    return unet, scheduler
