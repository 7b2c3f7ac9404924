"""COCO instance annotations (instances_train2017.json) as the instance loss's targets: per image, boxes,
contiguous labels and binary masks, resized with the image to a square training size, and its captions
(captions_train2017.json), which condition the denoising as in the paper's Eq. 16."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import MissingFileError
from .sources import DataError


class CocoInstances:
    """Images that have at least one non-crowd instance; labels are the category ids' ranks (0..79 on COCO)."""

    def __init__(self, annotations: str | Path, images: str | Path, captions: str | Path):
        path = Path(annotations)
        if not path.is_file():
            raise MissingFileError(f"COCO instances file not found: {path} (annotations/instances_train2017.json)")
        data = json.loads(path.read_text())
        anns = [a for a in data.get("annotations", []) if "segmentation" in a and "category_id" in a
                and not a.get("iscrowd", 0)]
        if not anns or not data.get("categories"):
            raise DataError(f"{path} has no instance annotations (annotations with 'segmentation' and "
                             f"'category_id', and 'categories'); a captions file gives no instances")
        self.label = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
        self.images = {im["id"]: im for im in data["images"]}
        self.by_image: dict[int, list[dict]] = {}
        for a in anns:
            self.by_image.setdefault(a["image_id"], []).append(a)
        self.captions = _captions(Path(captions))
        self.ids = sorted(i for i in self.by_image if i in self.captions)
        if not self.ids:
            raise DataError(f"no image of {path} has a caption in {captions} (captions_train2017.json pairs with "
                            f"instances_train2017.json)")
        self.root = Path(images)

    def caption(self, i: int, g: torch.Generator) -> str:
        """One of image i's captions (COCO has five), drawn with g."""
        options = self.captions[self.ids[i]]
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Image.Image, list[dict], dict]:
        info = self.images[self.ids[i]]
        return Image.open(self.root / info["file_name"]).convert("RGB"), self.by_image[self.ids[i]], info

    def sample(self, i: int, size: int) -> tuple[torch.Tensor, dict]:
        """(3, size, size) pixels in [0, 1] and {bboxes, labels, masks} on the same square resize."""
        image, anns, info = self[i]
        h, w = info["height"], info["width"]
        sx, sy = size / w, size / h
        masks, boxes, labels = [], [], []
        for a in anns:
            m = _decode(a["segmentation"], h, w)
            masks.append(np.asarray(Image.fromarray(m * 255).resize((size, size), Image.NEAREST)) > 127)
            x, y, bw, bh = a["bbox"]
            boxes.append([x * sx, y * sy, (x + bw) * sx, (y + bh) * sy])
            labels.append(self.label[a["category_id"]])
        pixels = torch.from_numpy(np.array(image.resize((size, size), Image.BICUBIC))).permute(2, 0, 1) / 255
        return pixels, {"bboxes": torch.tensor(boxes), "labels": torch.tensor(labels),
                        "masks": torch.from_numpy(np.stack(masks))}


def _captions(path: Path) -> dict[int, list[str]]:
    """{image id: [captions]} from a COCO captions file."""
    if not path.is_file():
        raise MissingFileError(f"COCO captions file not found: {path} (annotations/captions_train2017.json)")
    out: dict[int, list[str]] = {}
    for a in json.loads(path.read_text()).get("annotations", []):
        if "image_id" in a and "caption" in a:
            out.setdefault(a["image_id"], []).append(a["caption"].strip())
    if not out:
        raise DataError(f"{path} holds no captions (annotations with 'image_id' and 'caption')")
    return out


def _decode(seg, h: int, w: int) -> np.ndarray:
    """A COCO segmentation as an (h, w) uint8 mask: polygons, uncompressed RLE (counts a list) or RLE."""
    from pycocotools import mask as mask_utils
    if isinstance(seg, list):                         # polygons: one RLE each, merged
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)))
    if isinstance(seg["counts"], list):               # uncompressed RLE
        return mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
    return mask_utils.decode(seg)
