"""Image-caption samples from webdataset shards or a folder, as endless deterministic streams.

A source turns (seed, rank, world size) into one rank's stream of samples, epoch after epoch, in an order
fixed by the seed. Samples are decoded lazily (only the batches a worker builds are decoded) and a sample
that cannot be read or decoded reports it instead of raising: the batcher skips and counts it.

A sample without a caption (no .txt beside a folder's image; no txt, nor a json with a caption, in a shard) is
handled by the source's `missing_captions`: "error" stops the run naming the sample, "empty" trains it on the empty
prompt, counted and reported. Runs set it from data.missing_captions (default error); the library default is
"empty". `check_enough` reads the start of a source before any weights load: a source without one batch of usable
samples is named then, not after the models are in memory.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import count, islice
from pathlib import Path
from typing import Callable, Iterator

import webdataset as wds
from PIL import Image, ImageOps

from ..errors import HsdError, MissingFileError

log = logging.getLogger("hsd.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FOLDER_LAYOUT = f"a folder of images ({', '.join(IMAGE_EXTS)}), searched recursively, with same-stem .txt captions"
SHARD_FORMS = ("webdataset .tar shards: paths, brace patterns such as shards-{0000..0099}.tar, or pipe: commands, "
               "several joined by '::'")


CAPTION_KNOB = ("set data.missing_captions=empty to train such samples on the empty prompt (counted and reported); "
                "tscd.empty_prompts is the deliberate CFG dropout")


class DataError(HsdError, ValueError):
    """Data that cannot feed a run: a folder without images, fewer shards than ranks."""


class NoSamplesError(HsdError, RuntimeError):
    """A whole pass over the data yielded no readable sample."""


def seeded(seed: int, *tags) -> random.Random:
    """An RNG for one purpose, e.g. seeded(seed, "augment", uid). String seeds hash the same in every
    process (unlike hash()), so DataLoader workers and resumed runs draw the same numbers."""
    return random.Random(":".join(map(str, (seed, *tags))))


def decode_image(data: bytes) -> Image.Image:
    """RGB image, upright as displayed (phone photos store their rotation in EXIF)."""
    with Image.open(io.BytesIO(data)) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


@dataclass(eq=False)
class Sample:
    key: str                              # where it came from, for the log
    uid: int                              # unique position in the data stream: seeds its crop and flip
    epoch: int                            # the pass over the data it belongs to
    read: Callable[[], tuple[bytes, str | None]]  # -> (encoded image, caption or None when it has none)
    error: Exception | None = None
    decode: Callable[[bytes], object] = decode_image  # the image (a cache's record: hsd.data.cache)

    @cached_property
    def decoded(self) -> tuple[Image.Image, str | None] | None:
        """(image, caption or None), or None when undecodable, with the reason in self.error. Cached: a sample
        decoded to fill an earlier batch is not decoded again for its own."""
        try:
            data, caption = self.read()
            return self.decode(data), caption
        except Exception as err:  # a bad file can make PIL (or a disk, or json) raise almost anything
            self.error = err
            return None


def caption_of(sample: Sample, policy: str) -> str:
    """A decoded sample's caption; one without any is an error under "error", the empty prompt under "empty"."""
    caption = sample.decoded[1]
    if caption is None and policy == "error":
        raise DataError(f"sample {sample.key} has no caption; add one (a .txt beside the image, or txt/json in the "
                        f"shard), or {CAPTION_KNOB}")
    return caption or ""


def _tar_pair(sample: dict) -> tuple[bytes, str | None]:
    image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if image is None:
        raise ValueError(f"no image under any of {', '.join(IMAGE_EXTS)}")
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8", "replace")
    else:
        caption = json.loads(sample["json"]).get("caption") if "json" in sample else None
    return image, caption.strip() if caption is not None else None


def _file_pair(image: str, caption: str | None) -> tuple[bytes, str | None]:
    text = Path(caption).read_text(encoding="utf-8", errors="replace").strip() if caption else None
    return Path(image).read_bytes(), text


_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")  # http://, s3://, gs://...: webdataset opens them itself


def _log_and_continue(exn: Exception) -> bool:
    """webdataset handler for unreadable shards or tar members (warn_and_continue warns and sleeps)."""
    log.warning("skipping unreadable shard data: %r", exn)
    return True


class ShardSource:
    """Webdataset tar shards: paths, brace patterns and pipe: URLs, several joined by "::".

    Each epoch shuffles the shard list with the seed and gives rank r the shards r, r + world, ... of it,
    so ranks read disjoint shards; samples keep their order inside a shard."""

    def __init__(self, urls: str, missing_captions: str = "empty", pair: Callable = None, decode: Callable = None):
        self.missing_captions, self.where = missing_captions, urls
        # what a tar member holds: an image and its caption, or (hsd.data.cache) an encoded record and its caption
        self.pair, self.decode = pair or _tar_pair, decode or decode_image
        self.urls = wds.shardlists.expand_urls(urls)
        if not self.urls:
            raise DataError(f"no shards in {urls!r}; expected {SHARD_FORMS}")
        local = [u.removeprefix("file:") for u in self.urls if not u.startswith("pipe:") and not _REMOTE.match(u)]
        missing = [u for u in local if not os.path.isfile(u)]
        if missing and len(missing) == len(self.urls):
            what = "is not a file" if os.path.exists(missing[0]) else "not found"
            count = f" (nor are the other {len(missing) - 1})" if len(missing) > 1 else ""
            raise NoSamplesError(f"no samples could be read from {urls}: shard {missing[0]} {what}{count}; expected "
                                 f"{SHARD_FORMS}")
        if missing:  # read what there is, as with shards that fail to open later
            log.warning("%d of %d shards not found (skipped), e.g. %s", len(missing), len(self.urls), missing[0])

    def samples(self, seed: int, rank: int, world: int, batch_size: int, start: int) -> Iterator[Sample]:
        """The rank's stream from its window `start` on (a window is batch_size samples in a row)."""
        if len(self.urls) < world:
            raise DataError(f"{len(self.urls)} shards cannot be split over {world} ranks: give at least one "
                            f"shard per rank")
        # A tar stream cannot seek: reading past the consumed samples is cheap next to decoding them.
        return islice(self._stream(seed, rank, world), start * batch_size, None)

    def first_pass(self) -> Iterator[Sample]:
        """Every sample once, shards in their given order (what `check_enough` reads from the start)."""
        for pos, s in enumerate(wds.tarfile_samples(list(wds.SimpleShardList(self.urls)), handler=_log_and_continue)):
            yield Sample(f"{s['__url__']}:{s['__key__']}", pos, 0, partial(self.pair, s), decode=self.decode)

    def _stream(self, seed: int, rank: int, world: int) -> Iterator[Sample]:
        pos = 0
        for epoch in count():
            shards = list(wds.SimpleShardList(self.urls, seed=f"{seed}:shards:{epoch}"))[rank::world]
            first = pos
            for s in wds.tarfile_samples(shards, handler=_log_and_continue):
                yield Sample(f"{s['__url__']}:{s['__key__']}", pos * world + rank, epoch, partial(self.pair, s),
                             decode=self.decode)
                pos += 1
            if pos == first:  # cycling would spin forever
                raise NoSamplesError(f"no samples could be read from {[s['url'] for s in shards]}")


class FolderSource:
    """Images (any of IMAGE_EXTS, searched recursively), each captioned by a same-stem .txt file; images without
    one are refused at once under missing_captions="error", or train on the empty caption (counted, logged once).

    The data is one global stream (a seeded permutation of the images per epoch) cut into windows of
    batch_size; rank r takes the windows r, r + world, ..., so the global window of batch b on rank r is
    its index b * world + r."""

    def __init__(self, root: str, missing_captions: str = "empty"):
        self.missing_captions, self.where = missing_captions, root
        if not os.path.isdir(root):
            what = "is a file, not a folder" if os.path.exists(root) else "not found"
            raise MissingFileError(f"image folder {what}: {root} (expected {FOLDER_LAYOUT})")
        images, captions = [], set()
        for folder, _, names in os.walk(root):
            for name in names:
                stem, ext = os.path.splitext(os.path.join(folder, name))
                if ext.lower() == ".txt":
                    captions.add(stem)
                elif ext.lower()[1:] in IMAGE_EXTS:
                    images.append((stem, ext))
        if not images:
            raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) under {root} (expected {FOLDER_LAYOUT})")
        self.pairs = [(stem + ext, stem + ".txt" if stem in captions else None) for stem, ext in sorted(images)]
        missing = [image for image, caption in self.pairs if caption is None]
        if missing and missing_captions == "error":
            raise DataError(f"{len(missing)} of {len(self.pairs)} images under {root} have no .txt caption (e.g. "
                            f"{missing[0]}); add same-stem .txt files, or {CAPTION_KNOB}")
        if missing:
            log.warning("%d of %d images under %s have no .txt caption: they train with the empty caption",
                        len(missing), len(self.pairs), root)

    def first_pass(self) -> Iterator[Sample]:
        """Every image once, in sorted order (what `check_enough` reads from the start)."""
        for pos, (image, caption) in enumerate(self.pairs):
            yield Sample(image, pos, 0, partial(_file_pair, image, caption))

    def samples(self, seed: int, rank: int, world: int, batch_size: int, start: int) -> Iterator[Sample]:
        """The rank's stream from its window `start` on; random access, so nothing is read to get there."""
        n, order_epoch, order = len(self.pairs), None, []
        for b in count(start):
            first = (b * world + rank) * batch_size
            for pos in range(first, first + batch_size):
                epoch, i = divmod(pos, n)
                if epoch != order_epoch:
                    order_epoch, order = epoch, list(range(n))
                    seeded(seed, "order", epoch).shuffle(order)
                image, caption = self.pairs[order[i]]
                yield Sample(image, pos, epoch, partial(_file_pair, image, caption))


def check_enough(source: ShardSource | FolderSource, need: int, why: str) -> None:
    """Read the source from its start until `need` usable samples (one batch over every rank; `why` says how that
    number comes about) are found, before any weights load: fewer, or none at all, is one line naming the source.
    Under missing_captions="error" an uncaptioned sample among them is named too."""
    usable, seen, last = 0, 0, None
    for sample in source.first_pass():
        seen += 1
        if sample.decoded is None:
            last = sample
            continue
        caption_of(sample, source.missing_captions)
        usable += 1
        if usable >= need:
            return
    what = f"{seen} read" + (f", {seen - usable} unreadable, e.g. {last.key}" if last else "")
    if not usable:
        raise NoSamplesError(f"no usable sample in {source.where} ({what}); expected "
                             f"{SHARD_FORMS if isinstance(source, ShardSource) else FOLDER_LAYOUT}")
    raise DataError(f"{source.where} holds {usable} usable samples ({what}), fewer than one batch of {need} "
                    f"({why}): add data or lower the batch size")
