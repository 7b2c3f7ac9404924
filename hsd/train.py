"""The one training entry point: TSCD stages k = 8 -> 4 -> 2 -> 1 (each resuming the last), then the feedback
LoRA and the DMD stage when configured, then the world's report. A finished stage's artefact is reused, an
interrupted stage resumes from its last checkpoint."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from .config import Run, save_config
from .io import atomic_dir
from .lit.dmd import FAKE, DMDModule
from .lit.feedback import ADAPTER as FEEDBACK, FeedbackModule
from .lit.strategies import AtomicCheckpointIO, make_strategy
from .lit.tscd import TSCDModule
from .models import lora as lora_io
from .models.discriminator import FeatureDiscriminator, feature_channels
from .worlds import WORLDS


# Checkpoints are taken after the update on purpose: their state matches their global_step (exact resume).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


@dataclass
class Artefacts:
    """What a run produced: TSCD LoRAs per k, the feedback LoRA, the DMD generator (LoRA file or UNet folder)."""
    tscd: list[tuple[int, Path]] = field(default_factory=list)
    feedback: Path | None = None
    dmd: Path | None = None


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


def fit(cfg: Run, world, module, sdir: Path, updates: int, batch_size: int, seed: int, callbacks=()) -> L.Trainer:
    """Train `module` for `updates` batches' worth of updates, resuming from sdir's last checkpoint."""
    n = module.steps_per_update
    data = world.data(updates * module.accumulate, seed, lambda tr: module.batches_done(tr.global_step) if tr else 0,
                      batch_size)
    trainer = make_trainer(cfg, sdir, updates * n, cfg.trainer.ckpt_every * n, callbacks,
                           list(lora_io.lora_params(module.unet).values()))
    trainer.fit(module, datamodule=data, ckpt_path=last_checkpoint(sdir))
    return trainer


def run(cfg: Run) -> str:
    """Train every configured stage (skipping finished ones, resuming an interrupted one), then report."""
    out = Path(cfg.out_dir) / cfg.name
    save_config(cfg, out / "config.yaml")
    world = WORLDS[cfg.world](cfg)
    unet = world.unet
    L.seed_everything(cfg.seed, verbose=False)  # the LoRA's A matrices are drawn at random
    if cfg.model.lora_init:
        lora_io.load_lora_adapter(unet, cfg.model.lora_init)
    else:
        lora_io.attach_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    _fp32_lora(unet)
    made = Artefacts()
    unet = tscd_stages(cfg, world, unet, out, made)
    feedback_loss = functools.cache(world.feedback_loss)  # scorers and SOLO load once, and only when a stage trains
    if cfg.feedback.iterations:
        made.feedback = feedback_stage(cfg, world, unet, out, feedback_loss)
    if cfg.dmd.iterations:
        made.dmd = dmd_stage(cfg, world, unet, out, feedback_loss)
    return world.report(made, out)


def _fp32_lora(unet) -> None:
    for p in lora_io.lora_params(unet).values():  # trained in fp32 even when the frozen weights are bf16
        p.data = p.data.float()


def tscd_stages(cfg: Run, world, unet, out: Path, made: Artefacts):
    disc = None
    if any(s.w_adv > 0 for s in cfg.tscd.stages):
        disc = FeatureDiscriminator(feature_channels(unet), cfg.tscd.adv.hidden)
    for i, stage in enumerate(cfg.tscd.stages):
        path = stage_lora_path(out, i, stage.k)
        if path.exists():
            lora_io.load_lora(unet, path)
        else:
            L.seed_everything(cfg.seed + i, verbose=False)
            module = TSCDModule(unet, world.schedule, stage, cfg.tscd, seed=cfg.seed * 100 + i,
                                encoder=world.encoder, disc=disc, fsdp=cfg.trainer.strategy == "fsdp")
            steps = max(1, round(stage.iterations * cfg.tscd.iteration_scale))
            trainer = fit(cfg, world, module, out / f"stage{i}_k{stage.k}", steps, cfg.tscd.batch_size,
                          cfg.seed * 100 + i, world.callbacks(stage.k))
            unet = module.unet  # under FSDP the sharded UNet, which the next stages keep using
            _save_lora(trainer, path, unet, {"k": str(stage.k), "stage": "tscd"}, cfg)
        made.tscd.append((stage.k, path))
    return unet


def feedback_stage(cfg: Run, world, unet, out: Path, feedback_loss) -> Path:
    """The feedback LoRA, trained on top of the frozen TSCD LoRA; the UNet is left running the TSCD LoRA alone."""
    path = out / "lora_feedback.safetensors"
    L.seed_everything(cfg.seed + 50, verbose=False)
    lora_io.add_adapter(unet, FEEDBACK, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    _fp32_lora(unet)
    if path.exists():
        lora_io.load_lora(unet, path, adapter=FEEDBACK)
    else:
        module = FeedbackModule(unet, world.schedule, cfg.feedback, feedback_loss(), seed=cfg.seed * 100 + 50,
                                encoder=world.encoder, fsdp=cfg.trainer.strategy == "fsdp")
        trainer = fit(cfg, world, module, out / "feedback", cfg.feedback.iterations, cfg.feedback.batch_size,
                      cfg.seed * 100 + 50)
        _save_lora(trainer, path, unet, {"stage": "feedback"}, cfg, adapter=FEEDBACK)
    lora_io.use_adapters(unet, ["default"], ("default",))
    return path


def dmd_path(out: Path, d) -> Path:
    """The unified LoRA (timestep 999), a one-step LoRA (another timestep) or the one-step UNet folder (full)."""
    if d.generator == "full":
        return out / "unet_onestep"
    return out / ("lora_unified.safetensors" if d.timestep == 999 else f"lora_onestep_t{d.timestep}.safetensors")


def dmd_stage(cfg: Run, world, unet, out: Path, feedback_loss) -> Path:
    """DMD on the TSCD LoRA: a LoRA (generator=lora) or the one-step UNet folder (generator=full)."""
    d = cfg.dmd
    path = dmd_path(out, d)
    if path.exists():
        if d.generator == "lora":
            lora_io.load_lora(unet, path)
        return path
    L.seed_everything(cfg.seed + 60, verbose=False)
    if d.fake == "lora":
        lora_io.add_adapter(unet, FAKE, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
        _fp32_lora(unet)
    gen = lora_io.plain_unet(unet, {"default": 1.0}).float().requires_grad_(True) if d.generator == "full" else None
    fake = lora_io.plain_unet(unet).float().requires_grad_(True) if d.fake == "full" else None
    module = DMDModule(unet, world.schedule, d, feedback_loss() if d.w_feedback else None,
                       seed=cfg.seed * 100 + 60, encoder=world.encoder, fsdp=cfg.trainer.strategy == "fsdp",
                       generator_unet=gen, fake_unet=fake)
    trainer = fit(cfg, world, module, out / "dmd", d.iterations, d.batch_size, cfg.seed * 100 + 60)
    if d.generator == "lora":
        _save_lora(trainer, path, unet, {"stage": "dmd", "timestep": str(d.timestep)}, cfg)
    elif trainer.is_global_zero:
        with atomic_dir(path) as tmp:
            module.gen_unet.save_pretrained(tmp)
    trainer.strategy.barrier()
    return path


def _save_lora(trainer: L.Trainer, path: Path, unet, meta: dict, cfg: Run, adapter: str = "default") -> None:
    meta = {**meta, "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.alpha), "world": cfg.world}
    if trainer.is_global_zero:
        lora_io.save_lora(path, unet, meta, adapter=adapter)
        lora_io.save_lora(path.with_suffix(".kohya.safetensors"), unet, meta, fmt="kohya", adapter=adapter)
    trainer.strategy.barrier()
