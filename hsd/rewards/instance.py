"""Eq. 16's perceptual instance loss: mmdet's SOLO (configs/solo/solo_r50_fpn_1x_coco.py) on decoded images
x'_0 against their ground-truth instances, differentiable w.r.t. the pixels.

mmdet and mmcv come from `bash scripts/install_mmdet.sh` (mmcv built from source; see that script). The image
is normalised here, by hand, with the config's data-preprocessor constants: the preprocessor itself works on
uint8 batches and would cut the gradient. The detector stays frozen in eval mode (ResNet's BatchNorm keeps its
running statistics); only the pixels receive gradients.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import HsdError, MissingFileError, MissingPackageError

SOLO_CONFIG = "solo/solo_r50_fpn_1x_coco.py"
MEAN = (123.675, 116.28, 103.53)     # RGB order, on a 0-255 scale (the config's data_preprocessor)
STD = (58.395, 57.12, 57.375)


class InstanceLossError(HsdError, ValueError):
    """A SOLO checkpoint or instance annotation that cannot serve the instance loss."""


def _mmdet():
    try:
        import mmdet
        from mmdet.utils import register_all_modules
    except ImportError as e:
        raise MissingPackageError(f"the instance loss needs mmdet 3.3 and mmcv 2.1 ({e}); "
                          f"install them with: bash scripts/install_mmdet.sh") from e
    register_all_modules()
    return mmdet


def build_solo(num_classes: int = 80):
    """SOLO R50-FPN from the config inside the mmdet package, with random weights (no backbone download)."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    mmdet = _mmdet()
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / SOLO_CONFIG))
    cfg.model.backbone.init_cfg = None
    cfg.model.mask_head.num_classes = num_classes
    return MODELS.build(cfg.model)


def read_checkpoint(path: str | Path) -> dict:
    """A state dict from .safetensors or an mmdet .pth, loaded weights-only; numpy metadata is allowed by name."""
    from hsd.io import load_weights
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"SOLO checkpoint not found: {path} (e.g. solo_r50_fpn_1x_coco_*.pth from "
                                f"mmdet's model zoo, or its state dict as .safetensors)")
    try:
        return load_weights(path, numpy_metadata=True)
    except ValueError as e:
        raise InstanceLossError(str(e)) from e


def load_solo(checkpoint: str | Path | None = None, num_classes: int = 80):
    """SOLO, frozen, in eval mode; with `checkpoint`, its weights (class count checked against `num_classes`)."""
    model = build_solo(num_classes)
    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        key = "mask_head.conv_cls.weight"
        if key not in state:
            raise InstanceLossError(f"{checkpoint} is not a SOLO checkpoint (no {key})")
        if state[key].shape[0] != num_classes:
            raise InstanceLossError(f"{checkpoint} predicts {state[key].shape[0]} classes but the instance loss "
                                    f"is set up for {num_classes} (COCO has 80): a checkpoint for another dataset")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InstanceLossError(f"{checkpoint} does not fit SOLO R50-FPN: missing {missing[:4]}, "
                                    f"unexpected {unexpected[:4]}")
    return model.eval().requires_grad_(False)


class InstanceLoss(nn.Module):
    """pixels (B, 3, H, W) in [0, 1] + per-image instances {bboxes (N, 4) xyxy, labels (N,), masks (N, H, W)}
    -> SOLO's training loss (mask + classification), a scalar."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, instances: list[dict]) -> torch.Tensor:
        from mmdet.structures import DetDataSample
        from mmdet.structures.mask import BitmapMasks
        from mmengine.structures import InstanceData

        from hsd.scorers.images import check_unit
        check_unit(pixels)
        h, w = pixels.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"SOLO needs sides divisible by 32 (its preprocessor pads to that), got {h}x{w}")
        x = (pixels * 255 - pixels.new_tensor(MEAN).view(1, 3, 1, 1)) / pixels.new_tensor(STD).view(1, 3, 1, 1)
        samples = []
        for inst in instances:
            meta = dict(img_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w), ori_shape=(h, w),
                        scale_factor=(1.0, 1.0))
            sample = DetDataSample(metainfo=meta)
            masks = inst["masks"].cpu().numpy().astype("uint8")
            sample.gt_instances = InstanceData(bboxes=inst["bboxes"].float(), labels=inst["labels"].long(),
                                               masks=BitmapMasks(masks, h, w))
            samples.append(sample)
        losses = self.model.loss(x, samples)
        return sum(v for k, v in losses.items() if k.startswith("loss"))
