"""The Lightning Trainer of a stage: strategy, logger, checkpoints and a progress bar that names the stage."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from ..errors import ConfigError, MissingPackageError
from ..io import OLD_NAME
from .strategies import AtomicCheckpointIO, make_strategy

if TYPE_CHECKING:
    from ..config import Run

# Known-harmless messages of a stage's Trainer, each silenced here with its reason:
for message in (
    "Using ModelCheckpoint with manual optimization",  # checkpoints follow the update on purpose (exact resume)
    r"Found \d+ module\(s\) in eval mode",  # the frozen teacher, encoders and scorers are in eval mode on purpose
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6's pytree shim under torch 2.14
    "The number of training batches",  # short stages (the lab, tests) log less often than log_every
    "You're resuming from a checkpoint that ended before the epoch ended",  # batches are rebuilt from their index
):
    warnings.filterwarnings("ignore", message=message)
# an advertisement for a cloud logger, printed by every Trainer
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())


class StageProgressBar(TQDMProgressBar):
    """Lightning's bar, titled with the stage (a stage is one epoch of `max_steps`, so "Epoch 0" says nothing),
    and its losses to 4 significant digits (the default 3 decimals show a k = 8 loss of 2e-4 as 0.000)."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.stage)

    def get_metrics(self, trainer, module) -> dict:
        items = super().get_metrics(trainer, module)
        items.pop("v_num", None)
        return {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in items.items()}


def make_logger(kind: str, root: Path, version: str):
    """Any of Lightning's loggers by name, writing under the run folder (W&B offline: nothing leaves the machine)."""
    from lightning.pytorch import loggers
    if kind == "tensorboard":
        return loggers.TensorBoardLogger(root, name="tensorboard", version=version)
    if kind == "csv":
        return loggers.CSVLogger(root, name="csv", version=version)
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise MissingPackageError("trainer.logger=wandb needs the wandb package: pip install wandb") from e
    return loggers.WandbLogger(name=f"{root.name}/{version}", save_dir=root, offline=True)


def make_trainer(cfg: Run, sdir: Path, max_steps: int, ckpt_every: int, callbacks=(),
                 trained: list[torch.nn.Parameter] = (), stage: str = "") -> L.Trainer:
    """A stage's Trainer: checkpoints every `ckpt_every` optimizer steps in sdir/checkpoints (atomically), logs in
    the run folder under the stage's name."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    t = cfg.trainer
    check_launcher(t.num_nodes)
    bar = [StageProgressBar(stage or sdir.name)] if t.progress_bar else []
    try:
        return _trainer(cfg, sdir, max_steps, ckpt_every, [*bar, *callbacks], trained)
    except MisconfigurationException as e:  # e.g. trainer.accelerator=gpu on a machine without one
        raise ConfigError(f"trainer settings (accelerator {t.accelerator!r}, devices {t.devices}, strategy "
                          f"{t.strategy!r}, precision {t.precision!r}): {str(e).splitlines()[0]}") from e


# What a multi-node launcher leaves in the environment: SLURM's srun, torchrun, or a hand-set node rank.
LAUNCHERS = ("SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "NODE_RANK")


def check_launcher(num_nodes: int) -> None:
    """Several nodes need a launcher on each; started by hand, Lightning would wait for the others forever."""
    import os
    if num_nodes > 1 and not any(k in os.environ for k in LAUNCHERS):
        raise ConfigError(f"trainer.num_nodes={num_nodes}, but this process was not started by srun or torchrun on "
                          f"each node (docs/sd.md, Multi-node); on one machine set trainer.num_nodes=1")


def _trainer(cfg: Run, sdir: Path, max_steps: int, ckpt_every: int, callbacks: list, trained) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        max_steps=max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=make_strategy(cfg, trained), precision=t.precision,
        logger=make_logger(t.logger, sdir.parent, sdir.name),
        callbacks=[ModelCheckpoint(dirpath=sdir / "checkpoints", save_last=True, save_top_k=0,
                                   every_n_train_steps=ckpt_every), *callbacks],
        plugins=[AtomicCheckpointIO()], log_every_n_steps=t.log_every, enable_progress_bar=t.progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=t.accelerator == "cpu",
        use_distributed_sampler=False)  # every world's data shards itself by rank (hsd.data.batch)


def last_checkpoint(sdir: Path) -> Path | None:
    """The stage's last checkpoint: a file, or a folder of shards (hsd.lit.sharded). A crash between the two renames
    that put a new folder in place leaves only the previous one, under the name hsd.io.atomic_dir gives it."""
    for last in (sdir / "checkpoints" / "last.ckpt", sdir / "checkpoints" / OLD_NAME.format("last.ckpt")):
        if last.exists():
            return last
    return None
