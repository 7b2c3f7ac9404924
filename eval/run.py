"""The eval pass: for each model spec, generate over the prompts with fixed seeds, save the PNGs and score
them, one batch at a time; each image is decoded (or generated) once and cropped once for all four scorers.

Resumable by construction. A spec's folder is named by the hash of everything that shapes its images;
image i has seed `seed + i` and is written atomically as images/{i:05d}_s{seed}.png; each scored image
appends one JSON line to scores.jsonl, keyed by (index, prompt hash, seed) and the scorer weights'
fingerprint. A rerun generates only the missing PNGs and scores only the unscored keys, so a killed run
finishes with the table an uninterrupted one prints. Unreadable images are reported, counted and left out.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from hsd.errors import ConfigError
from hsd.io import atomic_path
from hsd.scorers.images import UnreadableImage, crop224, open_rgb, to_unit
from hsd.scorers.scorers import LOADERS, METRICS, load_scorers, score_batch


@dataclass(frozen=True)
class ModelSpec:
    """One table row: a base model, optional LoRAs or UNet, and the sampling recipe."""
    name: str
    model: str
    steps: int
    scheduler: str = "ddim"
    guidance: float | None = None     # default: 0 (no CFG), or FLUX.1's embedded 3.5 (hsd generate's default)
    lora: tuple[tuple[str, float], ...] = ()
    unet: str | None = None
    eta: float | None = None
    dtype: str = "float32"
    size: int | None = None           # default: the model's native size
    t5: bool = False                  # SD3: with the folder's T5 encoder (a LoRA trained with model.t5)
    paper: str | None = None          # the paper row to print beside ours (default: `name`)

    def __post_init__(self):
        if self.guidance is None:  # resolved here, so the key and the table hold the value the images used
            from hsd.pipelines.recipes import default_guidance, model_family
            object.__setattr__(self, "guidance", default_guidance(model_family(Path(self.model))))

    @property
    def type(self) -> str:
        return "LoRA" if self.lora else "UNet"

    def key(self) -> str:
        """Hash of the fields that shape the images (not the row's labels; t5 only when on, so the keys of the runs
        stored before it existed still match)."""
        shape = {k: v for k, v in asdict(self).items() if k not in ("name", "paper") and (k != "t5" or v)}
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        if not isinstance(d, dict):
            raise ConfigError(f"a model spec must be a mapping of {list(cls.__dataclass_fields__)}, got {d!r}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown model spec keys {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}")
        required = [k for k, f in cls.__dataclass_fields__.items()
                    if f.default is MISSING and f.default_factory is MISSING]
        absent = [k for k in required if k not in d]
        if absent:
            raise ConfigError(f"model spec {d.get('name', d)!r} lacks {absent}; required: {required}")
        try:
            lora = tuple((str(p), float(w)) for p, w in (d.get("lora") or ()))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model spec {d['name']!r}: lora must be a list of [file, weight] pairs, got "
                              f"{d.get('lora')!r}") from e
        return cls(**{**d, "lora": lora})


@dataclass
class Summary:
    spec: ModelSpec
    scores: dict[str, float]          # metric -> mean over scored images
    n: int                            # images scored
    skipped: list[str] = field(default_factory=list)   # unreadable images, with the reason


def item_key(i: int, prompt: str, seed: int) -> str:
    return f"{i}:{hashlib.sha256(prompt.encode()).hexdigest()[:12]}:{seed}"


class Item(NamedTuple):
    """Image i of a spec: its prompt, its seed and the key its scores are stored under."""
    i: int
    prompt: str
    seed: int
    key: str


def weights_fingerprint(weights: str | Path, metrics=METRICS) -> str:
    """Names and sizes of the scorer weight files: a change of weights invalidates stored scores."""
    root = Path(weights)
    files = sorted((str(p.relative_to(root)), p.stat().st_size)
                   for m in metrics for p in (root / LOADERS[m][0]).rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([sorted(metrics), files]).encode()).hexdigest()[:16]


def read_records(path: Path, fingerprint: str) -> dict[str, dict]:
    """Stored scores by item key; a torn last line (a kill mid-write) and other fingerprints are ignored."""
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("scorers") == fingerprint:
                records[r["item"]] = r
    return records


class Store:
    """One spec's folder: spec.json, images/, scores.jsonl."""

    def __init__(self, root: Path, spec: ModelSpec, fingerprint: str):
        self.dir = root / f"{spec.name}-{spec.key()}".replace("/", "_").replace(" ", "_")
        self.images = self.dir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / "spec.json") as tmp:
            Path(tmp).write_text(json.dumps(asdict(spec), indent=1))
        self.scores_path = self.dir / "scores.jsonl"
        self.fingerprint = fingerprint
        self.records = read_records(self.scores_path, fingerprint)

    def png(self, item: Item) -> Path:
        return self.images / f"{item.i:05d}_s{item.seed}.png"

    def append(self, records: list[dict]) -> None:
        with open(self.scores_path, "a") as f:
            f.write("".join(json.dumps({**r, "scorers": self.fingerprint}) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        self.records.update({r["item"]: r for r in records})


def evaluate_spec(spec: ModelSpec, prompts: list[str], scorers: dict, out: Path, fingerprint: str,
                  seed: int = 0, batch_size: int = 8, device: str = "cpu", load=None) -> Summary:
    """Generate what is missing, score what is unscored, and average. `load(spec)` makes the generator."""
    from tqdm import tqdm
    store = Store(out, spec, fingerprint)
    items = [Item(i, p, seed + i, item_key(i, p, seed + i)) for i, p in enumerate(prompts)]
    todo = [it for it in items if it.key not in store.records]
    skipped, generator = [], None
    with tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc=spec.name) as bar:
        for k in range(0, len(todo), batch_size):
            batch = todo[k:k + batch_size]
            missing = [it for it in batch if not store.png(it).exists()]
            if missing and generator is None:
                generator = (load or load_spec_generator)(spec, device)
            crops = _generate(generator, spec, missing, store, batch_size) if missing else {}
            for it in batch:
                if it not in missing:
                    try:
                        crops[it.key] = crop224(open_rgb(store.png(it)))
                    except UnreadableImage as e:
                        skipped.append(str(e))
                        warnings.warn(f"skipped: {e}")
            scored = [it for it in batch if it.key in crops]
            if scored:
                pixels = to_unit(torch.stack([crops[it.key] for it in scored])).to(device)
                values = score_batch(scorers, pixels, [it.prompt for it in scored])
                store.append([{"item": it.key, "i": it.i, "seed": it.seed, **{m: v[j] for m, v in values.items()}}
                              for j, it in enumerate(scored)])
            bar.update(len(batch))
    return summarize(spec, [store.records[it.key] for it in items if it.key in store.records], skipped)


def _generate(generator, spec: ModelSpec, items: list[Item], store: Store, batch_size: int) -> dict:
    from hsd.pipelines.generate import save_png
    images = generator.generate([it.prompt for it in items], spec.steps, [it.seed for it in items], spec.guidance,
                                spec.size, spec.size, batch_size)
    crops = {}
    for it, image in zip(items, images):
        save_png(image, store.png(it))
        crops[it.key] = crop224(image)           # PNG is lossless: the same crop a rerun decodes
    return crops


def load_spec_generator(spec: ModelSpec, device: str):
    from hsd.pipelines.generate import load_generator
    return load_generator(spec.model, list(spec.lora), spec.unet, spec.scheduler, spec.eta, spec.dtype, device,
                          t5=spec.t5)


def summarize(spec: ModelSpec, records: list[dict], skipped: list[str]) -> Summary:
    """Means over scored images. CLIP's mean is clipped at 0 as torchmetrics' CLIPScore does."""
    metrics = [m for m in (*METRICS, "PickScore_raw") if records and m in records[0]]
    scores = {m: sum(r[m] for r in records) / len(records) for m in metrics}
    if "CLIP" in scores:
        scores["CLIP"] = max(scores["CLIP"], 0.0)
    return Summary(spec, scores, len(records), skipped)


def run_eval(specs: list[ModelSpec], prompts: list[str], weights: str | Path, out: str | Path,
             metrics=METRICS, seed: int = 0, batch_size: int = 8, device: str = "cpu", load=None):
    """Every spec over every prompt; writes out/table.{md,csv,json} and returns the summaries."""
    from .coco import prompts_sha256
    from .table import write_tables
    out = Path(out)
    scorers = load_scorers(weights, tuple(metrics), device)
    fingerprint = weights_fingerprint(weights, tuple(metrics))
    summaries = [evaluate_spec(s, prompts, scorers, out, fingerprint, seed, batch_size, device, load)
                 for s in specs]
    write_tables(summaries, out, prompts_sha256(prompts), seed)
    return summaries
