"""The one training entry point: TSCD stages k = 8 -> 4 -> 2 -> 1, each resuming the last, then the report."""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .config import Run, save_config
from .io import atomic_path
from .lit.tscd import TSCDModule
from .models.discriminator import FeatureDiscriminator, feature_channels
from .models import lora as lora_io
from .worlds import WORLDS


# Checkpoints are taken after the update on purpose: their state matches their global_step (exact resume).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temp file renamed into place: a crash never leaves a torn last.ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def stage_lora_path(out: Path, i: int, k: int) -> Path:
    return out / f"lora_stage{i}_k{k}.safetensors"


def fsdp_kwargs(trained: list[torch.nn.Parameter]) -> dict:
    """FSDP settings: shard the frozen UNet on its down/mid/up blocks; leave the trained tensors alone.

    The trained tensors (LoRA, discriminator) are few and small: as `ignored_states` they stay whole on every
    rank like under DDP, so the EMA and its functional_call target work unchanged, and TSCDModule averages
    their gradients itself. The frozen weights, which are what is big, are sharded (ZeRO-3).
    """
    from diffusers.models.unets import unet_2d_blocks as blocks
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    wrap = {getattr(blocks, n) for n in ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                                           "CrossAttnUpBlock2D", "UpBlock2D")}
    return {"auto_wrap_policy": ModuleWrapPolicy(wrap), "use_orig_params": True, "ignored_states": list(trained)}


def unet_fsdp_strategy(base):
    """A Lightning FSDP strategy class that shards only the module's frozen UNet and checkpoints like DDP.

    - It wraps the UNet alone, leaving the LightningModule bare. Lightning runs training_step inside the
      root FSDP forward, so TSCD's manual backward passes would run before that forward ends, and FSDP then
      never finalises units whose weights are all frozen (they stay in BACKWARD_PRE and the next state_dict
      fails). With the UNet as its own root, every UNet call is a whole root forward before any backward.
    - The trained state (LoRA, EMA, discriminator, their optimizers) is a few MB and the same on every rank,
      so it is saved and restored as DDP does: one file from rank 0 (through the atomic CheckpointIO).
    """
    from lightning.pytorch.strategies import Strategy

    class UNetFSDPStrategy(base):
        lightning_module_state_dict = Strategy.lightning_module_state_dict
        optimizer_state = Strategy.optimizer_state
        save_checkpoint = Strategy.save_checkpoint
        load_checkpoint = Strategy.load_checkpoint
        remove_checkpoint = Strategy.remove_checkpoint
        load_model_state_dict = Strategy.load_model_state_dict
        load_optimizer_state_dict = Strategy.load_optimizer_state_dict
        lightning_restore_optimizer = Strategy.lightning_restore_optimizer  # FSDP's loads them itself: we don't

        def _setup_model(self, model):
            from torch.distributed.fsdp import FullyShardedDataParallel
            if isinstance(model.unet, FullyShardedDataParallel):  # a later stage: wrapped by the first
                return model
            model.unet = FullyShardedDataParallel(
                model.unet, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=self.root_device.index, **self.kwargs)
            return model
    return UNetFSDPStrategy


def make_strategy(cfg: Run, trained: list[torch.nn.Parameter] = ()):
    """DDP, or Lightning's FSDP around the frozen UNet (`unet_fsdp_strategy`, `fsdp_kwargs`)."""
    if cfg.trainer.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy
        # G and D are two backward passes of one forward, each leaving the other's parameters unused.
        return DDPStrategy(find_unused_parameters=True)
    if cfg.trainer.strategy != "fsdp":
        return cfg.trainer.strategy
    from lightning.pytorch.strategies import FSDPStrategy
    return unet_fsdp_strategy(FSDPStrategy)(**fsdp_kwargs(trained))


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
            data = world.data(steps, cfg.seed * 100 + i, lambda tr, m=module: m.batches_done(tr.global_step) if tr else 0)
            trained = list(lora_io.lora_params(unet).values()) + (list(disc.parameters()) if disc else [])
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
