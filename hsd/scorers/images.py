"""Image input shared by the four scorers.

All four reference models (OpenAI CLIP ViT-B/32 and ViT-L/14, ImageReward's BLIP ViT-L/16, PickScore's ViT-H/14)
take 224x224 crops made the same way (bicubic resize of the short side to 224, centre crop) and normalised with
the same OpenAI constants. So an image is decoded and cropped once and every scorer reads that one crop.

Pixels cross the scorer boundary as float in [0, 1], unnormalised; each scorer normalises itself.
`check_unit` refuses anything else, so an image in [0, 1] is never divided by 255 a second time (as a HF
processor given a float tensor would do) and a uint8 image is never mistaken for a float one.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize
from torchvision.transforms.functional import pil_to_tensor

from hsd.errors import HsdError

SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP; also ImageReward's and PickScore's processors
STD = (0.26862954, 0.26130258, 0.27577711)


class UnreadableImage(HsdError, ValueError):
    """An image file that PIL cannot decode (missing, truncated, not an image)."""


def open_rgb(path: str | Path) -> Image.Image:
    """Decode fully now, so a truncated file fails here and not later inside a batch."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:   # PIL raises all three for broken files
        raise UnreadableImage(f"cannot read image {path}: {e}") from e


def crop224(image: Image.Image, size: int = SIZE) -> torch.Tensor:
    """(3, size, size) uint8: the references' PIL bicubic short-side resize and centre crop."""
    image = CenterCrop(size)(Resize(size, interpolation=InterpolationMode.BICUBIC)(image.convert("RGB")))
    return pil_to_tensor(image)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_unit expects uint8 images, got {images.dtype}")
    return images.float() / 255


def check_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels must be float (B, 3, H, W) in [0, 1]."""
    if not pixels.is_floating_point():
        raise ValueError(f"scorers take float pixels in [0, 1], got {pixels.dtype} (convert uint8 with to_unit)")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"scorers take (B, 3, H, W) pixels, got shape {tuple(pixels.shape)}")
    lo, hi = pixels.min().item(), pixels.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"pixels must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                         f"(a [-1, 1] decoder output needs (x + 1) / 2; uint8 needs to_unit)")
    return pixels


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the OpenAI-normalised input all four models expect."""
    mean = pixels.new_tensor(MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(STD).view(1, 3, 1, 1)
    return (check_unit(pixels) - mean) / std


def resize_crop(pixels: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """The differentiable counterpart of `crop224` for training rewards: (B, 3, H, W) -> (B, 3, size, size).

    torch's antialiased bicubic instead of PIL's: differences are ~1e-2 per pixel, fine for a reward gradient;
    evaluation always goes through `crop224`.
    """
    h, w = pixels.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        pixels = F.interpolate(pixels, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        pixels = pixels[..., top:top + size, left:left + size].clamp(0, 1)
    return pixels
