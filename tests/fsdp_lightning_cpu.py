"""`hsd` with trainer.strategy=fsdp allowed on CPU, for tests only. Lightning refuses an FSDPStrategy of
exactly that class on a CPU accelerator, so a plain subclass with hsd's settings runs the same strategy code
on gloo; Lightning passes FSDP device_id=None (the CPU's device index), which torch's FSDP reads as "find
an accelerator", so the CPU device is filled in.

    python tests/fsdp_lightning_cpu.py train experiments/tiny/sd15.yaml ... trainer.strategy=fsdp trainer.devices=2
"""
import sys

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

import hsd.lit.trainer
from hsd.lit.strategies import fsdp_kwargs, unet_fsdp_strategy


class CPUFSDPStrategy(FSDPStrategy):
    pass


def make_strategy(cfg, trained=()):
    if cfg.trainer.strategy == "fsdp":
        cls = unet_fsdp_strategy(CPUFSDPStrategy)
        return cls(**fsdp_kwargs(trained))
    return _make_strategy(cfg, trained)


def _fsdp_init(self, module, *args, device_id=None, **kwargs):
    _init(self, module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


_make_strategy, hsd.lit.trainer.make_strategy = hsd.lit.trainer.make_strategy, make_strategy
_init, FullyShardedDataParallel.__init__ = FullyShardedDataParallel.__init__, _fsdp_init

if __name__ == "__main__":
    from hsd.cli import main
    main(sys.argv[1:])
