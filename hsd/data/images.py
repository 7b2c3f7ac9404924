"""Image-text batches for SD1.5 / SDXL training, rebuilt exactly on resume.

Batch b of a rank is window b of the rank's sample stream (batch_size samples in a row). Undecodable
samples in the window are skipped and their slots filled by the next decodable samples after it, which
stay in the stream for the following windows. So a batch depends on its number alone: resuming at b
skips b windows, and DataLoader workers take turns building whole batches.
"""
from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from itertools import count, islice
from typing import Iterable, Iterator

import lightning as L
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode

from .batch import EpochLoader, batches_done, global_index, rank_of
from .sources import FolderSource, NoSamplesError, Sample, ShardSource, caption_of, seeded

log = logging.getLogger("hsd.data")


@dataclass(frozen=True)
class Preprocess:
    """Shorter side to `resolution` (bicubic), optional horizontal flip, square crop, pixels in [-1, 1];
    with SDXL's size conditioning as diffusers' SDXL training scripts record it: the decoded image's
    (height, width) and the crop's (top, left) in the resized (and flipped) image."""
    resolution: int
    crop: str = "center"  # center | random
    flip: bool = False

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be center or random, not {self.crop!r}")

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, tuple, tuple]:
        R, original = self.resolution, (image.height, image.width)
        image = F.resize(image, R, interpolation=InterpolationMode.BICUBIC)
        if self.flip and rng.random() < 0.5:
            image = F.horizontal_flip(image)
        h, w = image.height, image.width
        if self.crop == "center":  # torchvision's CenterCrop rounding
            top, left = int(round((h - R) / 2.0)), int(round((w - R) / 2.0))
        else:
            top, left = rng.randint(0, h - R), rng.randint(0, w - R)
        pixels = F.to_dtype(F.to_image(F.crop(image, top, left, R, R)), torch.float32, scale=True)
        return pixels * 2 - 1, original, (top, left)


class _Lookahead:
    """An iterator that also shows what follows without consuming it."""

    def __init__(self, items: Iterable):
        self.items, self.ahead = iter(items), deque()

    def take(self, n: int) -> list:
        return [self.ahead.popleft() if self.ahead else next(self.items) for _ in range(n)]

    def following(self) -> Iterator:
        for i in count():
            if i == len(self.ahead):
                self.ahead.append(next(self.items))
            yield self.ahead[i]


def _decodable(samples: Iterable[Sample]) -> Iterator[Sample]:
    """The decodable samples; raises once a whole epoch went by without one (cycling would spin)."""
    boundaries, epoch = 0, None
    for s in samples:
        boundaries += epoch is not None and s.epoch != epoch
        epoch = s.epoch
        if s.decoded is not None:
            boundaries = 0
            yield s
        elif boundaries == 2:
            raise NoSamplesError(f"no decodable sample in a whole epoch of this rank's data (last: {s.key})")


class ImageTextBatches(IterableDataset):
    """A rank's batches start .. stop-1 (the loader runs with batch_size=None), each a dict:
    pixels (B, 3, R, R) in [-1, 1], captions (B strings), original_size and crop_top_left (B, 2) long,
    index = global_index(b, rank, world) (seeds the batch's noise: ranks draw different noise), skipped = number
    of undecodable samples in the batch's window (each logged with its key), uncaptioned = samples trained on the
    empty prompt for want of a caption (the source's missing_captions; the first one logged with its key)."""

    def __init__(self, source: ShardSource | FolderSource, prep: Preprocess, batch_size: int, start: int,
                 stop: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.source, self.prep, self.batch_size = source, prep, batch_size
        self.start, self.stop, self.seed, self.rank, self.world = start, stop, seed, rank, world
        self.warned = False

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream = _Lookahead(self.source.samples(self.seed, self.rank, self.world, self.batch_size, self.start))
        for b in range(self.start, self.stop):
            window = stream.take(self.batch_size)
            if (b - self.start) % workers == worker:  # the DataLoader reads its workers in turn
                yield self._batch(b, window, stream)

    def _filled(self, window: list[Sample], stream: _Lookahead) -> tuple[list[Sample], int]:
        """The window's decodable samples, topped up from the stream after it; and how many were skipped."""
        bad = [s for s in window if s.decoded is None]
        for s in bad:
            log.warning("skipping undecodable sample %s: %r", s.key, s.error)
        good = [s for s in window if s.decoded is not None]
        good += islice(_decodable(stream.following()), self.batch_size - len(good))
        return good, len(bad)

    def _batch(self, b: int, window: list[Sample], stream: _Lookahead) -> dict:
        good, bad = self._filled(window, stream)
        pixels, original, crop = zip(*(self.prep(s.decoded[0], seeded(self.seed, "augment", s.uid))
                                       for s in good))
        uncaptioned = [s for s in good if s.decoded[1] is None]
        if uncaptioned and not self.warned:
            self.warned = True
            log.warning("sample %s has no caption: it trains on the empty prompt, as will any other without one "
                        "(data.missing_captions=empty; counted in the logs as data/uncaptioned)", uncaptioned[0].key)
        return {"pixels": torch.stack(pixels), "captions": [caption_of(s, self.source.missing_captions) for s in good],
                "original_size": torch.tensor(original), "crop_top_left": torch.tensor(crop),
                "index": global_index(b, self.rank, self.world), "skipped": bad, "uncaptioned": len(uncaptioned)}


class ImageTextData(L.LightningDataModule):
    """`steps` batches of image-text pairs from webdataset `shards` or a caption `folder` (exactly one),
    cycling the data as needed. batch["skipped"] counts the undecodable samples since the loader started
    (it restarts from 0 on resume). Rank, world size and the batches already trained on come from the attached
    trainer."""
    batches = ImageTextBatches  # a cache's: hsd.data.cache.CachedBatches

    def __init__(self, shards: str = "", folder: str = "", *, resolution: int, batch_size: int, steps: int,
                 seed: int = 0, crop: str = "center", flip: bool = False, num_workers: int = 0):
        super().__init__()
        if bool(shards) == bool(folder):
            raise ValueError("give exactly one of shards or folder")
        self.shards, self.folder, self.prep = shards, folder, Preprocess(resolution, crop, flip)
        self.batch_size, self.steps, self.seed, self.num_workers = batch_size, steps, seed, num_workers

    @cached_property
    def source(self) -> ShardSource | FolderSource:
        return ShardSource(self.shards) if self.shards else FolderSource(self.folder)

    def train_dataloader(self) -> DataLoader:
        # Called after a checkpoint is restored: start at the first batch not yet trained on.
        batches = self.batches(self.source, self.prep, self.batch_size, batches_done(self.trainer), self.steps,
                                   self.seed, *rank_of(self.trainer))
        return EpochLoader(batches, num_workers=self.num_workers)
