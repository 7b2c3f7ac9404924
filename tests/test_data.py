import io
import json
import logging
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from hsd.data import ImageTextData

R = 16
SIZES = [(48, 32), (32, 48), (40, 40), (24, 20), (20, 30), (33, 17), (16, 16), (64, 24)]  # (w, h)


def _encode(w, h, fmt="JPEG", seed=0, color=None):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.new("RGB", (w, h), color) if color else Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _json_caption(sample):
    return {k: v for k, v in sample.items() if k != "txt"} | {"json": json.dumps({"caption": sample["txt"]})}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards, 10 samples: 8 decodable (jpg, jpeg, png, webp keys; txt and json captions), one corrupt
    jpg (shard-000.tar:s02) and one without an image (shard-001.tar:s11)."""
    d = tmp_path_factory.mktemp("shards")
    good = iter(enumerate(SIZES))

    def image(ext):
        i, (w, h) = next(good)
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
        return {ext: _encode(w, h, fmt, seed=i), "txt": f"cap-{i}"}

    content = [[image("jpg"), image("png"), {"jpg": b"\xff\xd8not a jpeg", "txt": "bad"}],
               [image("jpeg"), {"txt": "no image"}, _json_caption(image("webp"))],
               [image("jpg"), image("png")], [image("jpg"), image("jpg")]]
    for n, samples in enumerate(content):
        with wds.TarWriter(str(d / f"shard-{n:03d}.tar")) as w:
            for k, s in enumerate(samples):
                w.write({"__key__": f"s{n}{k}", **s})
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """5 images: a, sub/b, c (uppercase .JPG) captioned, d without caption, e corrupt."""
    d = tmp_path_factory.mktemp("folder")
    (d / "sub").mkdir()
    for i, (name, fmt) in enumerate([("a.jpg", "JPEG"), ("sub/b.png", "PNG"), ("c.JPG", "JPEG"),
                                     ("d.jpg", "JPEG")]):
        (d / name).write_bytes(_encode(*SIZES[i], fmt, seed=i))
    (d / "e.jpg").write_bytes(b"garbage")
    for name in ("a", "sub/b", "c", "e"):
        (d / f"{name}.txt").write_text(f"cap-{name}\n")
    return d


def _brace(d):
    return f"{d}/shard-{{000..003}}.tar"


def _trainer(rank=0, world=1, done=0):
    """What the data module reads of an attached trainer: its rank, world size and the batches already done."""
    progress = SimpleNamespace(batch_progress=SimpleNamespace(total=SimpleNamespace(processed=done)))
    return SimpleNamespace(global_rank=rank, world_size=world, fit_loop=SimpleNamespace(epoch_loop=progress))


def _batches(trainer=None, **kw):
    kw = {"resolution": R, "batch_size": 2, "steps": 5, "seed": 1} | kw
    dm = ImageTextData(**kw)
    dm.trainer = trainer
    return list(dm.train_dataloader())


def _same(a, b):
    return (a["captions"] == b["captions"] and a["index"] == b["index"]
            and all(torch.equal(a[k], b[k]) for k in ("pixels", "original_size", "crop_top_left")))


def test_sizes_and_center_crop_conditioning(tmp_path):
    (tmp_path / "wide.png").write_bytes(_encode(60, 40, "PNG", color=(255, 0, 0)))
    (tmp_path / "tall.png").write_bytes(_encode(30, 50, "PNG", color=(0, 0, 255)))
    (b,) = _batches(folder=str(tmp_path), resolution=32, steps=1, seed=0)
    assert b["pixels"].shape == (2, 3, 32, 32) and b["pixels"].dtype == torch.float32
    by_size = {tuple(o.tolist()): (c.tolist(), p) for o, c, p in
                  zip(b["original_size"], b["crop_top_left"], b["pixels"])}
    # wide 60x40 -> 48x32: left = (48 - 32) / 2; tall 30x50 -> 32x53: top = round(10.5) = 10 as torchvision
    (wide_crop, red), (tall_crop, blue) = by_size[(40, 60)], by_size[(50, 30)]
    assert wide_crop == [0, 8] and tall_crop == [10, 0]
    assert torch.allclose(red, torch.tensor([1.0, -1, -1]).view(3, 1, 1), atol=1e-2)
    assert torch.allclose(blue, torch.tensor([-1.0, -1, 1]).view(3, 1, 1), atol=1e-2)
    assert b["original_size"].dtype == b["crop_top_left"].dtype == torch.long


def test_brace_pattern_and_pipe_urls_read_the_same_shards(shards):
    brace = _batches(shards=_brace(shards))
    piped = _batches(shards="::".join(f"pipe:cat {shards}/shard-{n:03d}.tar" for n in range(4)))
    assert len(brace) == 5 and all(_same(a, b) for a, b in zip(brace, piped))
    for b in brace:
        assert b["pixels"].shape == (2, 3, R, R) and b["pixels"].min() >= -1 and b["pixels"].max() <= 1
        assert b["original_size"].shape == b["crop_top_left"].shape == (2, 2)
    assert [b["index"] for b in brace] == list(range(5))
    assert {tuple(o) for b in brace for o in b["original_size"].tolist()} <= {(h, w) for w, h in SIZES}


def test_undecodable_samples_are_skipped_counted_and_logged(shards, caplog):
    with caplog.at_level(logging.WARNING, logger="hsd.data"):
        batches = _batches(shards=_brace(shards))  # 5 batches of 2: exactly one pass over the 10 samples
    assert [b["skipped"] for b in batches][-1] == 2
    assert all(len(b["captions"]) == 2 for b in batches)
    assert {c for b in batches for c in b["captions"]} == {f"cap-{i}" for i in range(8)}
    logged = [r.getMessage() for r in caplog.records if r.name == "hsd.data"]
    assert len(logged) == 2 and any("shard-000.tar:s02" in m for m in logged)
    assert any("shard-001.tar:s11" in m and "no image" in m for m in logged)


def test_unreadable_shards_are_logged_and_the_rest_read(shards, caplog):
    with caplog.at_level(logging.WARNING, logger="hsd.data"):
        batches = _batches(shards=f"{shards}/shard-{{000..004}}.tar")  # there is no shard-004
    assert len(batches) == 5 and any("shard-004.tar" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="no samples could be read"):
        _batches(shards=f"{shards}/missing-{{0..1}}.tar")


def test_wholly_undecodable_data_raises_instead_of_spinning(tmp_path):
    for name in ("x.jpg", "y.png"):
        (tmp_path / name).write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="no decodable sample"):
        _batches(folder=str(tmp_path))


def test_folder_source(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="hsd.data"):
        batches = _batches(folder=str(folder), batch_size=1)  # one pass over the 5 files
    assert {c for b in batches for c in b["captions"]} == {"cap-a", "cap-sub/b", "cap-c", ""}
    assert batches[-1]["skipped"] == 1
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "hsd.data")
    assert "1 of 5 images" in logged and "e.jpg" in logged


@pytest.mark.parametrize("kind", ["shards", "folder"])
def test_same_seed_same_batches_and_exact_resume(kind, shards, folder):
    src = {"shards": _brace(shards)} if kind == "shards" else {"folder": str(folder)}
    kw = src | {"crop": "random", "flip": True, "steps": 7}  # 14 samples: cycles into the second epoch
    full = _batches(**kw)
    assert all(_same(a, b) for a, b in zip(full, _batches(**kw)))
    assert not all(_same(a, b) for a, b in zip(full, _batches(**kw | {"seed": 2})))
    resumed = _batches(_trainer(done=3), **kw)
    assert [b["index"] for b in resumed] == [3, 4, 5, 6] and all(_same(a, b) for a, b in zip(full[3:], resumed))


def test_two_ranks_read_disjoint_shards(shards):
    ranks = [_batches(_trainer(rank=r, world=2), shards=_brace(shards),
                      batch_size=1, steps=2) for r in range(2)]  # each rank has >= 4 samples per pass
    assert [[b["index"] for b in bs] for bs in ranks] == [[0, 2], [1, 3]]
    c0, c1 = ({c for b in bs for c in b["captions"]} for bs in ranks)
    assert len(c0) == len(c1) == 2 and not c0 & c1


def test_two_ranks_split_a_folder_pass(tmp_path):
    for i, size in enumerate(SIZES[:6]):
        (tmp_path / f"{i}.png").write_bytes(_encode(*size, "PNG", seed=i))
        (tmp_path / f"{i}.txt").write_text(f"cap-{i}")
    ranks = [_batches(_trainer(rank=r, world=2), folder=str(tmp_path),
                      batch_size=1, steps=3) for r in range(2)]  # 2 ranks x 3 batches of 1: one pass
    assert [[b["index"] for b in bs] for bs in ranks] == [[0, 2, 4], [1, 3, 5]]
    c0, c1 = ({c for b in bs for c in b["captions"]} for bs in ranks)
    assert len(c0) == len(c1) == 3 and c0 | c1 == {f"cap-{i}" for i in range(6)}


def test_cycles_when_the_data_is_shorter_than_steps(folder):
    batches = _batches(folder=str(folder), batch_size=3, steps=6)  # 18 samples from 5 files
    captions = [c for b in batches for c in b["captions"]]
    assert len(batches) == 6 and len(captions) == 18 and set(captions) == {"cap-a", "cap-sub/b", "cap-c", ""}
    assert batches[-1]["skipped"] >= 3  # the corrupt file once per pass


def test_workers_build_the_same_batches(shards):
    kw = {"shards": _brace(shards), "crop": "random", "flip": True}
    single, workers = _batches(**kw), _batches(**kw, num_workers=2)
    assert all(_same(a, b) for a, b in zip(single, workers))
    assert [b["skipped"] for b in single] == [b["skipped"] for b in workers]


class _Probe(L.LightningModule):
    """Records the batches it trains on."""

    def __init__(self):
        super().__init__()
        self.w, self.seen = torch.nn.Parameter(torch.zeros(())), []

    def training_step(self, batch, _):
        self.seen.append((batch["index"], batch["captions"], batch["pixels"]))
        return (self.w - batch["pixels"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_from_a_checkpoint_trains_each_batch_once(folder, tmp_path):
    def fit(max_steps, out, ckpt=None):
        probe = _Probe()
        L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[ModelCheckpoint(
                      dirpath=out, save_last=True, save_top_k=0, every_n_train_steps=2)]).fit(
            probe, ckpt_path=ckpt, datamodule=ImageTextData(
                folder=str(folder), resolution=R, batch_size=2, steps=5, crop="random", flip=True))
        return probe.seen

    full = fit(5, tmp_path / "full")
    first = fit(2, tmp_path / "cut")
    rest = fit(5, tmp_path / "cut", tmp_path / "cut" / "last.ckpt")
    assert [i for i, *_ in first + rest] == [0, 1, 2, 3, 4]
    assert all(a[1] == b[1] and torch.equal(a[2], b[2]) for a, b in zip(full, first + rest, strict=True))


def test_missing_captions_policy_for_a_folder(folder):
    from hsd.data.sources import DataError, FolderSource
    with pytest.raises(DataError, match=r"1 of 5 images under .* have no \.txt caption \(e\.g\. .*d\.jpg\)"):
        FolderSource(str(folder), "error")
    dm = ImageTextData(folder=str(folder), resolution=R, batch_size=1, steps=5, seed=1)
    dm.source = FolderSource(str(folder), "empty")
    dm.trainer = None
    batches = list(dm.train_dataloader())
    assert batches[-1]["uncaptioned"] == 1  # a running total, like "skipped": d.jpg, once in the pass
    assert [c for b in batches for c in b["captions"]].count("") == 1


def test_missing_captions_policy_for_shards_is_applied_as_samples_are_read(tmp_path):
    """A shard cannot be listed up front: an uncaptioned sample met mid-stream stops the run under "error"."""
    from hsd.data.sources import DataError, ShardSource
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        w.write({"__key__": "k0", "jpg": _encode(16, 16), "txt": "cap"})
        w.write({"__key__": "k1", "jpg": _encode(16, 16, seed=1)})
    for policy, expect in (("error", "sample .*s.tar:k1 has no caption"), ("empty", None)):
        dm = ImageTextData(shards=str(tmp_path / "s.tar"), resolution=R, batch_size=2, steps=1)
        dm.source, dm.trainer = ShardSource(str(tmp_path / "s.tar"), policy), None
        if expect:
            with pytest.raises(DataError, match=expect):
                list(dm.train_dataloader())
        else:
            (batch,) = dm.train_dataloader()
            assert batch["captions"] == ["cap", ""] and batch["uncaptioned"] == 1


def test_check_enough_names_a_source_too_small_or_unusable(folder, tmp_path):
    from hsd.data.sources import DataError, FolderSource, NoSamplesError, check_enough
    source = FolderSource(str(folder), "empty")
    check_enough(source, 4, "2 per rank")  # a, sub/b, c, d are decodable
    with pytest.raises(DataError, match=r"holds 4 usable samples \(5 read, 1 unreadable, e\.g\. .*e\.jpg\), "
                                        r"fewer than one batch of 6 \(3 per rank x 2\)"):
        check_enough(source, 6, "3 per rank x 2")
    (tmp_path / "x.jpg").write_bytes(b"junk")
    (tmp_path / "x.txt").write_text("cap")
    with pytest.raises(NoSamplesError, match="no usable sample in .* \\(1 read, 1 unreadable"):
        check_enough(FolderSource(str(tmp_path), "error"), 1, "1 per rank")
