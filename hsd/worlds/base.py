"""What a world is to the training loop: the protocol every world module implements, and what a run made."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import lightning as L
    from torch import nn

    from ..diffusion.schedule import NoiseSchedule
    from ..models.adapters import Adapters
    from ..rewards.feedback import FeedbackLoss


@dataclass
class Artefacts:
    """What a run produced: TSCD LoRAs per k, the feedback LoRA, the DMD generator (LoRA file or UNet folder)."""
    tscd: list[tuple[int, Path]] = field(default_factory=list)
    feedback: Path | None = None
    dmd: Path | None = None


class World(Protocol):
    """A world built from a validated Run (its config rules: hsd.config.worlds): the denoiser to distil (`unet`: a UNet
    or a transformer), its schedule, its frozen encoder, its data and rewards, and the report of a finished run. Every
    stage reads its batches as `hsd.data.batch.Batch`."""
    unet: nn.Module
    schedule: NoiseSchedule
    encoder: nn.Module | None  # raw batch -> Batch (frozen VAE + text); None when the data is already encoded

    def data(self, batches: int, seed: int, batch_size: int) -> L.LightningDataModule:
        """`batches` micro-batches per rank, each rebuilt from its global index and `seed`."""

    def callbacks(self, k: int) -> list[L.Callback]:
        """Stage-end callbacks of the TSCD stage with k segments (samples to the logger)."""

    def feedback_loss(self) -> FeedbackLoss:
        """The rewards (Eq. 15) and, where the world has one, the instance term (Eq. 16)."""

    def report(self, made: Artefacts, out: Path, adapters: Adapters) -> str:
        """The run's report (markdown), written into `out`."""


def labelled_grid(images, labels: list[str], nrow: int, scale: int = 1):
    """(N, 3, H, W) images in [0, 1] as a PIL grid of `nrow` per row, each row's label to its left."""
    import torch
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid
    images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    pixels = make_grid(images, nrow=nrow, padding=2, pad_value=1.0).mul(255).round().byte().permute(1, 2, 0)
    grid = Image.fromarray(pixels.cpu().numpy())
    font = ImageFont.load_default(size=14)
    width = max(int(font.getlength(text)) for text in labels) + 12
    canvas = Image.new("RGB", (width + grid.width, grid.height), "white")
    canvas.paste(grid, (width, 0))
    draw, row = ImageDraw.Draw(canvas), (grid.height - 2) / len(labels)
    for i, text in enumerate(labels):
        draw.text((6, 2 + row * (i + 0.5)), text, fill="black", font=font, anchor="lm")
    return canvas


def log_image(trainer, tag: str, images, labels: list[str], nrow: int, scale: int = 1) -> None:
    """A labelled sample grid to the run's logger, where the logger takes images (TensorBoard)."""
    experiment = getattr(trainer.logger, "experiment", None)
    if hasattr(experiment, "add_image"):
        from torchvision.transforms.functional import pil_to_tensor
        grid = pil_to_tensor(labelled_grid(images, labels, nrow, scale))
        experiment.add_image(tag, grid, trainer.global_step)
