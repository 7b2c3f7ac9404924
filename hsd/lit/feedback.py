"""Human-feedback learning (Hyper-SD §3.2) as a LightningModule, ReFL-style, on a LoRA of its own.

The UNet runs with the TSCD LoRA ("default", frozen) and the feedback LoRA ("feedback", trained) summed: the
same model as the TSCD LoRA fused into the weights. x_T is denoised without gradient along the student's
DDIM-trailing grid to a random grid step t in [t_left, t_right]; one step with gradient predicts x'_0,
which the rewards (Eq. 15) score; the instance loss (Eq. 16) adds its own noised COCO images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..data.batch import Batch, RawBatch
from ..diffusion.schedule import NoiseSchedule
from ..models.adapters import FEEDBACK, TSCD
from ..rewards.feedback import Refl
from .base import StageModule

if TYPE_CHECKING:
    from ..config import Feedback
    from ..rewards.feedback import FeedbackLoss


class FeedbackModule(StageModule):
    active, trained = (TSCD, FEEDBACK), (FEEDBACK,)  # the TSCD LoRA runs frozen under the feedback LoRA

    def __init__(self, unet, schedule: NoiseSchedule, cfg: Feedback, loss: FeedbackLoss, seed: int = 0,
                 encoder=None, fsdp: bool = False):
        super().__init__(unet, schedule, seed, encoder, fsdp)
        self.cfg, self.loss = cfg, loss
        self.use_adapters()
        self.refl = Refl(schedule.T, cfg.steps, cfg.t_range)

    def x0_from_noise(self, batch: Batch, g: torch.Generator) -> Tensor:
        """x_T -> (no gradient) the grid step t_j, j drawn from the stops in t_range -> x'_0 (gradient)."""
        x = torch.randn(batch["x0"].shape, generator=g).to(batch["x0"])
        return self.refl.x0(self, x, 0, batch["cond"], g)

    def training_step(self, batch: RawBatch, batch_idx: int) -> Tensor:
        g = self.generator(batch)
        batch = self.encode(batch, g)
        losses, rewards = self.loss(self.x0_from_noise(batch, g), batch, self, g)
        self.log_grad_norms(losses, self.adapters.params(FEEDBACK).values(), batch)
        loss = torch.stack(list(losses.values())).sum()
        self.manual_backward(loss)
        self._step(self.optimizers(), self.cfg.grad_clip)
        self.log("train/feedback_loss", loss, prog_bar=True)
        self.log_dict({f"train/feedback_{k}": v for k, v in losses.items()} |
                      {f"train/reward_{k}": v for k, v in rewards.items()})
        return loss.detach()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.adapters.params(FEEDBACK).values(), lr=self.cfg.lr, weight_decay=0.0)

    def trained_tensors(self) -> dict[str, Tensor]:
        return {f"unet.{n}": p for n, p in self.adapters.params(FEEDBACK).items()}
