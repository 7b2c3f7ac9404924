"""`hsd` with two hooks for the 2-process lab tests (Lightning's DDP launcher re-runs this script on each rank):
every lab batch a rank draws is recorded in $HSD_TEST_RECORD/rank<R>.txt (global index and a checksum of x0), and
with $HSD_TEST_STOP_AT=N the run dies before its batch N + 1, as a crash would, after the checkpoint of step N.

    python tests/ddp_lab_cpu.py train experiments/lab/tscd.yaml trainer.devices=2 trainer.strategy=ddp ...
"""
import os
import sys
from pathlib import Path

import lightning as L

import hsd.train
from hsd.worlds.lab import LabData

_make_batch, _make_trainer = LabData.make_batch, hsd.train.make_trainer


def make_batch(self, index):
    batch = _make_batch(self, index)
    rank = self.trainer.global_rank if self.trainer is not None else 0
    with open(Path(os.environ["HSD_TEST_RECORD"]) / f"rank{rank}.txt", "a") as f:
        f.write(f"{index} {batch['x0'].double().sum().item():.10f}\n")
    return batch


class Crash(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == int(os.environ["HSD_TEST_STOP_AT"]):
            raise SystemExit(f"crash before step {trainer.global_step + 1}")


def make_trainer(*args, **kwargs):
    trainer = _make_trainer(*args, **kwargs)
    if os.environ.get("HSD_TEST_STOP_AT"):
        trainer.callbacks.append(Crash())
    return trainer


LabData.make_batch = make_batch
hsd.train.make_trainer = make_trainer

if __name__ == "__main__":
    from hsd.cli import main
    main(sys.argv[1:])
