"""The one training entry point: TSCD stages k = 8 -> 4 -> 2 -> 1, each resuming the last, then the report."""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from .config import Run, save_config
from .lit.strategies import AtomicCheckpointIO, make_strategy
from .lit.tscd import TSCDModule
from .models.discriminator import FeatureDiscriminator, feature_channels
from .models import lora as lora_io
from .worlds import WORLDS


# Checkpoints are taken after the update on purpose: their state matches their global_step (exact resume).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def stage_lora_path(out: Path, i: int, k: int) -> Path:
    return out / f"lora_stage{i}_k{k}.safetensors"


def make_trainer(cfg: Run, sdir: Path, max_steps: int, ckpt_every: int, callbacks=(),
                 trained: list[torch.nn.Parameter] = ()) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        max_steps=max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=make_strategy(cfg, trained), precision=t.precision,
        logger=TensorBoardLogger(sdir.parent, name="tensorboard", version=sdir.name),
        callbacks=[ModelCheckpoint(dirpath=sdir / "checkpoints", save_last=True, save_top_k=0,
                                   every_n_train_steps=ckpt_every), *callbacks],
        plugins=[AtomicCheckpointIO()], log_every_n_steps=t.log_every, enable_progress_bar=t.progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=t.accelerator == "cpu")


def last_checkpoint(sdir: Path) -> Path | None:
    last = sdir / "checkpoints" / "last.ckpt"
    return last if last.exists() else None


def run(cfg: Run) -> str:
    """Train every stage (skipping finished ones, resuming an interrupted one), then write the report."""
    out = Path(cfg.out_dir) / cfg.name
    save_config(cfg, out / "config.yaml")
    world = WORLDS[cfg.world](cfg)
    unet = world.unet
    L.seed_everything(cfg.seed, verbose=False)  # the LoRA's A matrices are drawn at random
    if cfg.model.lora_init:
        lora_io.load_lora_adapter(unet, cfg.model.lora_init)
    else:
        lora_io.attach_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    for p in lora_io.lora_params(unet).values():  # trained in fp32 even when the frozen weights are bf16
        p.data = p.data.float()
    disc = None
    if any(s.w_adv > 0 for s in cfg.tscd.stages):
        disc = FeatureDiscriminator(feature_channels(unet), cfg.tscd.adv.hidden)
    loras = []
    for i, stage in enumerate(cfg.tscd.stages):
        path = stage_lora_path(out, i, stage.k)
        steps = max(1, round(stage.iterations * cfg.tscd.iteration_scale))
        if path.exists():
            lora_io.load_lora(unet, path)
        else:
            L.seed_everything(cfg.seed + i, verbose=False)
            sdir = out / f"stage{i}_k{stage.k}"
            module = TSCDModule(unet, world.schedule, stage, cfg.tscd, seed=cfg.seed * 100 + i,
                                encoder=world.encoder, disc=disc, fsdp=cfg.trainer.strategy == "fsdp")
            n = module.steps_per_update
            data = world.data(steps * cfg.tscd.accumulate, cfg.seed * 100 + i, lambda tr, m=module: m.batches_done(tr.global_step) if tr else 0)
            trained = list(lora_io.lora_params(unet).values())
            trainer = make_trainer(cfg, sdir, steps * n, cfg.trainer.ckpt_every * n, world.callbacks(stage.k),
                                   trained)
            trainer.fit(module, datamodule=data, ckpt_path=last_checkpoint(sdir))
            unet = module.unet  # under FSDP the sharded UNet, which the next stages keep using
            meta = {"k": str(stage.k), "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.alpha),
                    "world": cfg.world}
            if trainer.is_global_zero:
                lora_io.save_lora(path, unet, meta)
                lora_io.save_lora(path.with_suffix(".kohya.safetensors"), unet, meta, fmt="kohya")
            trainer.strategy.barrier()
        loras.append((stage.k, path))
    return world.report(loras, out)
