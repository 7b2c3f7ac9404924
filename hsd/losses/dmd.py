"""Distribution matching distillation (Hyper-SD §3.3, Eq. 10) as pure functions, normalised as DMD2 does."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dmd_gradient(x0: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """Eq. 10's score difference, in x0 space: (fake_x0 - real_x0) / mean|x0 - real_x0| per sample.

    x0: generator samples (B, ...); real_x0 / fake_x0: the teacher's (with CFG) and the fake score network's
    x0 predictions from the same noised x0. DMD2's per-sample normaliser makes the step scale-free.
    """
    dims = tuple(range(1, x0.ndim))
    norm = (x0 - real_x0).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / norm)


def dmd_loss(x0: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """0.5 * MSE(x0, stopgrad(x0 - grad)): its gradient w.r.t. x0 is the DMD gradient / numel."""
    grad = dmd_gradient(x0.detach(), real_x0.detach(), fake_x0.detach())
    return 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float())


def fake_score_loss(pred: Tensor, target: Tensor) -> Tensor:
    """The fake score network's objective: the standard denoising loss on generator samples, in the network's own
    parametrisation (the schedule's target: eps for VP, the velocity for flow)."""
    return F.mse_loss(pred.float(), target.float())
