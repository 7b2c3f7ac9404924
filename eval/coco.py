"""COCO-5k: one caption for each of the 5,000 val2017 images, by a fixed rule, with the list's sha256.

Rule: images in ascending image id; for each, its caption annotation with the smallest annotation id;
whitespace collapsed to single spaces and stripped. Images without a caption are left out (val2017 has none).
The prompt file is those captions, one per line, UTF-8, "\n"-terminated; its sha256 is recorded with every
result so two tables are only compared over the same prompts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hsd.errors import ConfigError, MissingFileError
from hsd.io import atomic_path


def coco_captions(annotations: str | Path) -> list[tuple[int, str]]:
    """(image_id, caption) pairs from a COCO captions file (e.g. annotations/captions_val2017.json)."""
    path = Path(annotations)
    if not path.is_file():
        raise MissingFileError(f"COCO captions file not found: {path} (e.g. annotations/captions_val2017.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        first: dict[int, tuple[int, str]] = {}
        for a in data["annotations"]:
            key = (a["id"], " ".join(a["caption"].split()))
            if a["image_id"] not in first or key < first[a["image_id"]]:
                first[a["image_id"]] = key
        image_ids = sorted({im["id"] for im in data["images"]})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a COCO captions file (needs 'images' with 'id' and 'annotations' "
                          f"with 'id', 'image_id', 'caption'): {type(e).__name__}: {e}") from e
    return [(i, first[i][1]) for i in image_ids if i in first]


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("".join(p + "\n" for p in prompts).encode("utf-8")).hexdigest()


def write_prompts(prompts: list[str], path: str | Path) -> str:
    """Write one prompt per line (atomically) and return the list's sha256."""
    if any("\n" in p for p in prompts):
        raise ValueError("prompts must be single lines")
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return prompts_sha256(prompts)


def coco5k(annotations: str | Path, out: str | Path) -> tuple[Path, str, int]:
    """Write the COCO-5k prompt list beside a .json of its image ids; (path, sha256, count)."""
    pairs = coco_captions(annotations)
    out = Path(out)
    sha = write_prompts([c for _, c in pairs], out)
    meta = {"source": str(annotations), "rule": "smallest caption annotation id per image, images by id",
            "sha256": sha, "count": len(pairs), "image_ids": [i for i, _ in pairs]}
    with atomic_path(out.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(meta))
    return out, sha, len(pairs)
