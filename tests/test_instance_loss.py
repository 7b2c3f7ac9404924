"""Eq. 16's instance loss through mmdet's SOLO (mmcv built by scripts/install_mmdet.sh), on CPU."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hsd.data.coco_instances import CocoInstances
from hsd.rewards.instance import InstanceLoss, InstanceLossError, build_solo, load_solo


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255).astype("uint8")).save(root / "images/1.jpg")
    data = {"images": [{"id": 1, "file_name": "1.jpg", "height": 96, "width": 128}],
            "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 18, "iscrowd": 0, "bbox": [10, 20, 50, 40],
                 "segmentation": [[10, 20, 60, 20, 60, 60, 10, 60]]},
                {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [70, 10, 40, 70],
                 "segmentation": [[70, 10, 110, 10, 110, 80, 70, 80]]}]}
    (root / "instances.json").write_text(json.dumps(data))
    (root / "captions.json").write_text(json.dumps({"annotations": [
        {"id": 7, "image_id": 1, "caption": "a dog beside a person "}, {"id": 8, "image_id": 1, "caption": "two"}]}))
    return CocoInstances(root / "instances.json", root / "images", root / "captions.json")


def test_coco_instances_resize_with_the_image(coco):
    pixels, inst = coco.sample(0, 64)
    assert pixels.shape == (3, 64, 64) and 0 <= pixels.min() and pixels.max() <= 1
    assert inst["labels"].tolist() == [1, 0]                      # category ids 18, 1 -> ranks 1, 0
    assert torch.allclose(inst["bboxes"][0], torch.tensor([5.0, 40 / 3, 30.0, 40.0]))
    assert inst["masks"].shape == (2, 64, 64) and 0.05 < inst["masks"][0].float().mean() < 0.2


def test_captions_are_drawn_per_image(coco):
    draws = {coco.caption(0, torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws == {"a dog beside a person", "two"}  # both of image 1's captions, stripped


def test_annotations_without_instances_or_captions_are_refused(coco, tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps(
        {"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]}))
    with pytest.raises(ValueError, match="no instance annotations"):
        CocoInstances(tmp_path / "captions.json", tmp_path, tmp_path / "captions.json")
    root = coco.root.parent
    (tmp_path / "other.json").write_text(json.dumps({"annotations": [{"id": 1, "image_id": 5, "caption": "x"}]}))
    with pytest.raises(ValueError, match="no image of .* has a caption"):
        CocoInstances(root / "instances.json", root / "images", tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="COCO captions file not found"):
        CocoInstances(root / "instances.json", root / "images", tmp_path / "missing.json")


def test_solo_loss_reaches_the_pixels(coco):
    loss_fn = InstanceLoss(load_solo())
    pixels, inst = coco.sample(0, 64)
    pixels = pixels[None].repeat(2, 1, 1, 1).requires_grad_(True)
    loss = loss_fn(pixels, [inst, inst])
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()
    assert not any(p.requires_grad for p in loss_fn.model.parameters())


def test_solo_checkpoint_class_count_is_checked(tmp_path):
    state = build_solo(num_classes=20).state_dict()
    torch.save({"meta": {"CLASSES": tuple(f"c{i}" for i in range(20)), "epoch": 12,
                         "seed": np.int64(0)}, "state_dict": state}, tmp_path / "voc.pth")
    with pytest.raises(InstanceLossError, match="predicts 20 classes but .* set up for 80"):
        load_solo(tmp_path / "voc.pth")
    assert load_solo(tmp_path / "voc.pth", num_classes=20) is not None   # numpy metadata loads weights-only
    torch.save({"state_dict": state, "meta": {"hook": Image.Image}}, tmp_path / "code.pth")
    with pytest.raises(InstanceLossError, match="not plain data"):
        load_solo(tmp_path / "code.pth", num_classes=20)
