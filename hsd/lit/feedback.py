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
from ..diffusion.segments import inference_timesteps
from ..diffusion.solvers import ddim_step
from ..errors import ConfigError
from ..models.adapters import FEEDBACK, TSCD
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
        self.grid = inference_timesteps(schedule.T, cfg.steps)  # descending: T-1, ..., T/steps - 1
        lo, hi = cfg.t_range
        self.stops = [i for i, t in enumerate(self.grid.tolist()) if lo <= t <= hi]
        if not self.stops:
            raise ConfigError(f"feedback.t_range {cfg.t_range} holds none of the {cfg.steps}-step grid's timesteps "
                              f"{self.grid.tolist()}")

    def x0_from_noise(self, batch: Batch, g: torch.Generator) -> Tensor:
        """x_T -> (no gradient) the grid step t_j, j drawn from the stops in t_range -> x'_0 (gradient)."""
        like, cond = batch["x0"], batch["cond"]
        x = torch.randn(like.shape, generator=g).to(like)
        j = self.stops[int(torch.randint(len(self.stops), (1,), generator=g))]
        at = [torch.full((like.shape[0],), int(t), device=like.device) for t in self.grid]
        with torch.no_grad():
            for i in range(j):
                x = ddim_step(self.schedule, x, self.eps(x, at[i], cond), at[i], at[i + 1])
        return self.denoise(x, at[j], cond)

    def training_step(self, batch: RawBatch, batch_idx: int) -> Tensor:
        g = self.generator(batch)
        batch = self.encode(batch, g)
        losses, rewards = self.loss(self.x0_from_noise(batch, g), batch, self.denoise, self.schedule, g)
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
