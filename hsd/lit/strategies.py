"""Lightning plumbing for training stages: atomic checkpoint files, and the DDP / FSDP strategies."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..io import atomic_path
from . import sharded
from .resume import LIGHTNING_KEYS, check_resumable, unreadable_checkpoint

if TYPE_CHECKING:
    from ..config import Run


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temp file renamed into place: a crash never leaves a torn last.ckpt, a failed write (disk
    full) keeps the previous one. One that cannot be read back is one line naming it (`unreadable_checkpoint`)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a Python file: a failed write raises OSError
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        import pickle
        check_resumable(path)
        try:
            checkpoint = super().load_checkpoint(path, map_location, weights_only)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:  # torch.load's, for a
            first = str(e).strip().split(". ")[0].splitlines()[0]  # torn, foreign or unreadable file: its first words
            raise unreadable_checkpoint(path, f"{type(e).__name__}: {first}") from e
        missing = [k for k in LIGHTNING_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
        if missing or ("state_dict" not in checkpoint and not checkpoint.get("sharded")):
            raise unreadable_checkpoint(path, f"not a Lightning checkpoint: no {(missing or ['state_dict'])[0]!r}")
        return checkpoint


def fsdp_kwargs(trained: list[torch.nn.Parameter]) -> dict:
    """FSDP settings: shard the frozen denoiser on its blocks (a UNet's down/mid/up, a transformer's joint blocks:
    hsd.models.denoisers.denoiser_blocks); leave the trained tensors alone.

    The LoRA tensors are few and small: as `ignored_states` they stay whole on every rank like under DDP, so
    the EMA and its functional_call target work unchanged, and TSCDModule averages their gradients itself
    (the discriminator lives outside the wrapped UNet and is never sharded). The frozen weights, which are what is
    big, are sharded (ZeRO-3).
    """
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from ..models.denoisers import block_classes
    return {"auto_wrap_policy": ModuleWrapPolicy(block_classes()), "use_orig_params": True,
            "ignored_states": list(trained)}


def unet_fsdp_strategy(base):
    """A Lightning FSDP strategy class that shards the module's frozen UNet and its trained full copies.

    - It wraps the UNet alone, leaving the LightningModule bare. Lightning runs training_step inside the
      root FSDP forward, so TSCD's manual backward passes would run before that forward ends, and FSDP then
      never finalises units whose weights are all frozen (they stay in BACKWARD_PRE and the next state_dict
      fails). With the UNet as its own root, every UNet call is a whole root forward before any backward.
    - LoRA recipes: the trained state (LoRA, EMA, discriminator, their optimizers) is a few MB and the same on
      every rank, so it is saved and restored as DDP does: one file from rank 0 (through the atomic CheckpointIO).
    - Full fine-tunes (the module's `trained_copies`, e.g. DMD's one-step generator and fake score): each copy is
      sharded with FSDP2 (`hsd.lit.sharded`), and checkpoints become folders of shards written atomically.
    """
    from lightning.pytorch.strategies import Strategy

    class UNetFSDPStrategy(base):
        lightning_module_state_dict = Strategy.lightning_module_state_dict
        optimizer_state = Strategy.optimizer_state
        remove_checkpoint = Strategy.remove_checkpoint
        lightning_restore_optimizer = Strategy.lightning_restore_optimizer  # FSDP's loads them itself: we don't

        def _setup_model(self, model):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import FullyShardedDataParallel
            if not isinstance(model.unet, FullyShardedDataParallel):  # a later stage: wrapped by the first
                model.unet = FullyShardedDataParallel(
                    model.unet, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=self.root_device.index, **self.kwargs)
            copies = model.trained_copies()
            if copies:
                mesh = init_device_mesh(self.root_device.type, (self.world_size,))
                for unet in copies:
                    sharded.shard_copy(unet, mesh, str(self.precision_plugin.precision))
            return model

        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            if not self.lightning_module.trained_copies():
                return Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)
            sharded.save_sharded(self, checkpoint, self.lightning_module, filepath)

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            if Path(checkpoint_path).is_dir():
                return sharded.load_sharded(self, self.lightning_module, checkpoint_path, weights_only)
            return Strategy.load_checkpoint(self, checkpoint_path, weights_only)

        # a folder checkpoint has filled the tensors and optimizer states in place already
        def load_model_state_dict(self, checkpoint, strict=True):
            if not checkpoint.get("sharded"):
                Strategy.load_model_state_dict(self, checkpoint, strict)

        def load_optimizer_state_dict(self, checkpoint):
            if not checkpoint.get("sharded"):
                Strategy.load_optimizer_state_dict(self, checkpoint)
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
