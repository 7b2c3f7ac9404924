"""`hsd cache`: a run's data encoded once (VAE latents and text conditioning) into webdataset shards with a manifest,
so a run given the cache (data.cache) trains without a text encoder or a VAE on the GPU (issue 23: FLUX.1's T5-XXL
alone is 9.3 GiB).

What a cached sample holds: the VAE posterior's parameters (mean and log-variance, as `latent_dist.parameters`), not a
latent drawn from it, so each batch still draws its latents with the batch's own generator exactly as the uncached
run does (hsd.models.conditioning.vae_encode); the denoiser's conditioning as the world's text encoders make it (in
their dtype); the caption. The empty prompt's conditioning is stored once (the unconditional branch of CFG and
tscd.empty_prompts); SDXL's is zeros with each sample's size numbers, as uncached. Images are center-cropped and not
flipped: a cache holds one view of each image, so data.crop=random or data.flip=true is refused.

Order: one cache shard per source shard, with its samples in their order (an undecodable one left out), so a cached
run reads the same stream as the uncached run over the same shards (hsd.data.sources.ShardSource) and trains the same
LoRA to rounding; a folder source is written as shards of SHARD_SIZE in its sorted order (its cached stream is a
shard stream, not the folder's permutation). The manifest records the world, resolution, the VAE's scaling and the
SHA-256 of the encoder weight files; a run whose model or resolution differs is refused in one line.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load as load_record
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn

from ..errors import ConfigError, HsdError
from ..io import atomic_dir
from ..names import DIT_WORLDS
from .batch import global_index
from .images import ImageTextBatches, ImageTextData

FORMAT = 1
MANIFEST, EMPTY = "manifest.json", "empty.safetensors"
SHARD_SIZE = 1000
log = logging.getLogger("hsd.cache")


class CacheError(HsdError, ValueError):
    """A cache folder that cannot serve the run: missing or torn manifest, another model or resolution."""


# ---- the record: nested conditioning dicts as flat safetensors keys ----
def flatten(tree: dict, prefix: str) -> dict[str, Tensor]:
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v.contiguous()})
    return out


def unflatten(flat: dict[str, Tensor], prefix: str) -> dict:
    out: dict = {}
    for key, v in flat.items():
        if not key.startswith(prefix + "."):
            continue
        *path, leaf = key[len(prefix) + 1:].split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _pair(sample: dict) -> tuple[bytes, str | None]:
    """A cache shard member: (the record's safetensors bytes, its caption)."""
    return sample["safetensors"], sample["txt"].decode("utf-8")


# ---- the manifest ----
def encoder_files(cfg) -> list[Path]:
    """The weight files of what a cache replaces: the text encoders and the VAE of model.path (or model.vae), or
    the single-file checkpoint that holds them."""
    m, path = cfg.model, Path(cfg.model.path)
    if path.is_file():
        return [path]
    subs = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if cfg.world == "sd3" and m.t5 else [])
    folders = [path / s for s in subs] + [Path(m.vae) if m.vae else path / "vae"]
    return sorted(f for d in folders if d.is_dir() for f in d.iterdir() if f.is_file())


def fingerprint(files: list[Path]) -> str:
    """SHA-256 over the files' names and contents (read once; no model is built)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def expected(cfg) -> dict:
    """What a cache must have been made with to serve this run."""
    return {"format": FORMAT, "world": cfg.world, "resolution": cfg.model.resolution,
            "t5": bool(cfg.model.t5) if cfg.world == "sd3" else None,
            "frozen_dtype": cfg.model.frozen_dtype, "vae_dtype": cfg.model.vae_dtype}


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CacheError(f"data.cache {folder}: no {MANIFEST} there (expected a folder `hsd cache CONFIG --out "
                         f"{folder}` wrote)")
    try:
        manifest = json.loads(path.read_text())
        manifest["shards"], manifest["encoders"]  # noqa: B018 (the keys every manifest has)
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(f"data.cache {folder}: {MANIFEST} is torn or foreign ({type(e).__name__}: {e}); rerun "
                         f"`hsd cache`") from e
    return manifest


def check_cache(cfg, manifest: dict) -> None:
    """Refuse a cache made for another model, resolution or dtype, naming the first difference."""
    want = expected(cfg)
    for key, value in want.items():
        if manifest.get(key) != value:
            raise CacheError(f"data.cache {cfg.data.cache} was made with {key}={manifest.get(key)!r}, but this run "
                             f"has {key}={value!r}; rerun `hsd cache` with this run's config")
    found = fingerprint(encoder_files(cfg))
    if manifest["encoders"] != found:
        raise CacheError(f"data.cache {cfg.data.cache} was made with other text encoder / VAE weights than "
                         f"model.path={cfg.model.path} holds (SHA-256 {manifest['encoders'][:12]}..., these "
                         f"{found[:12]}...); rerun `hsd cache` with this run's model")


def check_view(cfg) -> None:
    if cfg.data.crop != "center" or cfg.data.flip:
        raise ConfigError(f"a cache holds one view of each image (center crop, no flip), but the run has "
                          f"data.crop={cfg.data.crop} data.flip={str(cfg.data.flip).lower()}; set data.crop=center "
                          f"data.flip=false, or train uncached")


# ---- writing ----
def _groups(source):
    """(shard name, samples) per source shard, or per SHARD_SIZE samples of a folder, in the source's order."""
    from .sources import ShardSource
    name, group = None, []
    for i, s in enumerate(source.first_pass()):
        here = (Path(s.key.rsplit(":", 1)[0]).stem if isinstance(source, ShardSource)
                else f"cache-{i // SHARD_SIZE:05d}")
        if here != name and group:
            yield name, group
            group = []
        name = here
        group.append(s)
    if group:
        yield name, group


def write_cache(cfg, out: str | Path, log_line=None) -> Path:
    """Encode the run's data (data.shards or data.folder) with its world's VAE and text encoders into `out`."""
    import webdataset as wds

    from ..models.conditioning import PipelineText, TextConditioner
    from ..models.load import load_world_components
    from .images import Preprocess
    from .sources import FolderSource, ShardSource, caption_of
    if cfg.world not in ("sd15", "sdxl", "sd3", "flux"):
        raise ConfigError(f"hsd cache encodes the SD worlds' data (sd15, sdxl, sd3, flux), got world {cfg.world!r} "
                          f"(the lab's data is drawn already encoded)")
    d, m = cfg.data, cfg.model
    if d.cache:
        raise ConfigError(f"hsd cache reads data.shards or data.folder, and data.cache={d.cache} is set: unset it")
    check_view(cfg)
    source = ShardSource(d.shards, d.missing_captions) if d.shards else FolderSource(d.folder, d.missing_captions)
    c = load_world_components(cfg)
    dtype = getattr(torch, m.vae_dtype)  # a cast, even to float32, makes diffusers warn: only when it changes
    vae = (c.vae if c.vae.dtype == dtype else c.vae.to(dtype)).requires_grad_(False)
    text = PipelineText(c) if c.family in DIT_WORLDS else TextConditioner(c.family, c.text_encoders, c.tokenizers)
    prep, R = Preprocess(m.resolution, "center", False), m.resolution
    shards, samples, skipped = [], 0, 0
    with atomic_dir(out) as tmp, torch.no_grad():
        for name, group in _groups(source):
            with wds.TarWriter(str(tmp / f"{name}.tar")) as tar:
                for s in group:
                    if s.decoded is None:
                        skipped += 1
                        log.warning("skipping undecodable sample %s: %r", s.key, s.error)
                        continue
                    caption = caption_of(s, source.missing_captions)
                    pixels, original, crop = prep(s.decoded[0], None)
                    with torch.autocast("cpu", enabled=False):
                        params = vae.encode(pixels[None].to(vae.dtype)).latent_dist.parameters[0].float()
                    cond = text([caption], torch.tensor([original]), torch.tensor([crop]), (R, R))
                    record = {"latent": params, **{k: v[0] for k, v in flatten(cond, "cond").items()}}
                    tar.write({"__key__": f"{samples:09d}", "safetensors": save(record), "txt": caption})
                    samples += 1
            shards.append(f"{name}.tar")
            if log_line:
                log_line(f"{name}.tar: {samples} samples so far")
        empty = text([""], None, None, (R, R))
        save_file({k: v.contiguous() for k, v in flatten(empty, "cond").items()}, tmp / EMPTY)
        manifest = {**expected(cfg), "model": str(m.path), "source": d.shards or d.folder, "samples": samples,
                    "skipped": skipped, "shards": shards, "crop": "center", "flip": False,
                    "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.get("shift_factor"),
                    "latent_downscale": 2 ** (len(vae.config.block_out_channels) - 1),
                    "encoders": fingerprint(encoder_files(cfg))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out)


# ---- reading ----
def cache_source(folder: str | Path, manifest: dict, missing_captions: str):
    """The cache's shards as a ShardSource whose samples decode to records (same stream logic as the data's)."""
    from .sources import ShardSource
    urls = "::".join(str(Path(folder) / s) for s in manifest["shards"])
    return ShardSource(urls, missing_captions, pair=_pair, decode=load_record)


class CachedEncoder(nn.Module):
    """{cached records} -> {x0, cond, uncond}, in place of LatentEncoder: the latents drawn from the stored posterior
    with the batch's generator (as vae_encode draws them), the stored conditioning, the empty prompt's. No weights."""

    def __init__(self, family: str, manifest: dict, empty: dict):
        super().__init__()
        self.family, self.scale, self.shift = family, manifest["scaling_factor"], manifest["shift_factor"]
        self.empty = empty

    @torch.no_grad()
    def forward(self, batch: dict, g: torch.Generator) -> dict:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        from ..models.conditioning import expand_empty, sdxl_uncond
        z = DiagonalGaussianDistribution(batch["latent"]).sample(generator=g)
        x0 = ((z - self.shift if self.shift else z) * self.scale).float()
        cond = batch["cond"]
        if self.family == "sdxl":
            uncond = sdxl_uncond(cond)
        else:
            first = next(iter(flatten(cond, "c").values()))
            uncond = expand_empty(self.empty, first.shape[0], first.device)
        return {**batch, "x0": x0, "cond": cond, "uncond": uncond}


class CachedBatches(ImageTextBatches):
    """ImageTextBatches over a cache's records: the same windows, skips and indices; the records stacked."""

    def _batch(self, b: int, window, stream) -> dict:
        good, bad = self._filled(window, stream)
        records = [s.decoded[0] for s in good]
        stacked = {k: torch.stack([r[k] for r in records]) for k in records[0]}
        return {"latent": stacked["latent"], "cond": unflatten(stacked, "cond"),
                "captions": [s.decoded[1] for s in good], "index": global_index(b, self.rank, self.world),
                "skipped": bad}


def cached_data(source, *, resolution: int, batch_size: int, steps: int, seed: int, num_workers: int):
    """The data module of a cached run: ImageTextData's loader over the cache's records."""
    data = ImageTextData(folder=".", resolution=resolution, batch_size=batch_size, steps=steps, seed=seed,
                         num_workers=num_workers)
    data.source, data.batches = source, CachedBatches
    return data


def load_empty(folder: str | Path) -> dict:
    return unflatten(load_file(Path(folder) / EMPTY), "cond")
