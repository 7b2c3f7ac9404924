"""Batches keyed by their global index, so any batch can be rebuilt exactly on resume."""
from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..lab.world import LabWorld


class IndexedBatches(Dataset):
    """Item i is the whole batch number start + i (the loader runs with batch_size=None)."""

    def __init__(self, make_batch: Callable[[int], dict], start: int, stop: int):
        self.make_batch, self.start, self.stop = make_batch, start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int) -> dict:
        return {**self.make_batch(self.start + i), "index": self.start + i}


class EpochLoader(DataLoader):
    """Reports the whole epoch's length while a resumed run yields only the remaining batches: Lightning
    restores how many batches of the epoch were done and ends the epoch at len(loader), so a length of only
    the remaining batches would end it early and start the loader over (repeating batches)."""

    def __init__(self, dataset: IndexedBatches, **kwargs):
        super().__init__(dataset, batch_size=None, shuffle=False, **kwargs)

    def __len__(self) -> int:
        return self.dataset.stop


class LabData(L.LightningDataModule):
    """Lab samples: class labels, clean x0 from the exact mixture, prompt embeddings (cond and uncond)."""

    def __init__(self, world: LabWorld, prompt_emb: torch.Tensor, empty_emb: torch.Tensor, batch_size: int,
                 steps: int, seed: int = 0, start_fn: Callable | None = None):
        super().__init__()
        self.start_fn = start_fn  # trainer -> batches already trained on (after a checkpoint is restored)
        self.world, self.emb, self.empty = world, prompt_emb, empty_emb
        self.batch_size, self.steps, self.seed = batch_size, steps, seed

    def make_batch(self, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        labels = torch.randint(self.world.n_classes, (self.batch_size,), generator=g)
        return {"x0": self.world.sample(labels, g).float(), "labels": labels, "cond": self.emb[labels],
                "uncond": self.empty.expand(self.batch_size, -1, -1)}

    def train_dataloader(self) -> DataLoader:
        # Called after a checkpoint is restored: start at the first batch not yet trained on.
        start = 0 if self.trainer is None else (self.start_fn or (lambda tr: tr.global_step))(self.trainer)
        return EpochLoader(IndexedBatches(self.make_batch, start, self.steps))
