"""The batch contract between every world's data and every stage, and the loader plumbing for exact resume.

A batch is a dict (Lightning moves it to the device as it is). Data modules fill `RawBatch`; a stage's encoder
turns it into a `Batch` (the lab's data is already encoded). `index` is the batch's global index: micro-batch b of
rank r in a world of W ranks has index b * W + r in every world, so ranks draw different noise and data, and a
resumed run rebuilds any batch from its index alone.
"""
from __future__ import annotations

from typing import Callable, Iterator, TypedDict

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class RawBatch(TypedDict, total=False):
    index: int                      # global batch index (global_index)
    x0: torch.Tensor                # lab: clean samples (B, C, H, W)
    labels: torch.Tensor            # lab: class of each sample (B,)
    cond: torch.Tensor | dict       # lab: prompt embeddings; SD: UNet keyword arguments (after encoding)
    uncond: torch.Tensor | dict     # the empty prompt's conditioning, the same layout
    pixels: torch.Tensor            # SD: images in [-1, 1] (B, 3, R, R)
    latents: torch.Tensor           # SD: pre-encoded latents instead of pixels
    captions: list[str]             # SD
    original_size: torch.Tensor     # SDXL size conditioning (B, 2)
    crop_top_left: torch.Tensor     # (B, 2)
    skipped: int                    # undecodable samples so far on this rank
    uncaptioned: int                # samples so far on this rank trained on the empty prompt for want of a caption


class Batch(RawBatch):
    """What a stage reads after encoding: x0, cond and uncond are always present."""


def global_index(micro_batch: int, rank: int, world_size: int) -> int:
    return micro_batch * world_size + rank


def micro_batch(index: int, world_size: int) -> int:
    """The rank-local micro-batch number of a global index."""
    return index // world_size


def batches_done(trainer: L.Trainer | None) -> int:
    """Micro-batches this rank has trained on, as Lightning restored them from the checkpoint (0 without one).

    Lightning counts a batch processed before the checkpoint of that step is written, so after a restore this is
    the number of batches the checkpoint includes (its `completed` count lags by one).
    """
    return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.total.processed


class IndexedBatches(Dataset):
    """Item i is the whole micro-batch start + i of this rank (the loader runs with batch_size=None)."""

    def __init__(self, make_batch: Callable[[int], dict], start: int, stop: int, rank: int = 0, world_size: int = 1):
        self.make_batch, self.start, self.stop, self.rank, self.world_size = make_batch, start, stop, rank, world_size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int) -> dict:
        index = global_index(self.start + i, self.rank, self.world_size)
        return {**self.make_batch(index), "index": index}


COUNTS = ("skipped", "uncaptioned")  # per-batch counts of the data's faults, reported as running totals


class EpochLoader(DataLoader):
    """Reports the whole epoch's length while a resumed run yields only the remaining batches: Lightning
    restores how many batches of the epoch were done and ends the epoch at len(loader), so a length of only
    the remaining batches would end it early and start the loader over (repeating batches). Each batch's
    skipped and uncaptioned counts become running totals, summed here since a worker only sees its own batches."""

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)  # every item is a whole batch

    def __len__(self) -> int:
        return self.dataset.stop

    def __iter__(self) -> Iterator[dict]:
        totals = dict.fromkeys(COUNTS, 0)
        for batch in super().__iter__():
            for key in COUNTS:
                totals[key] += batch.get(key, 0)
            yield {**batch, **{k: totals[k] for k in COUNTS if k in batch}}


def rank_of(trainer: L.Trainer | None) -> tuple[int, int]:
    """(rank, world size) of the attached trainer; (0, 1) without one."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
