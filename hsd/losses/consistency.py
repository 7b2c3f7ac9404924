"""TSCD consistency loss (Hyper-SD Eq. 14) as pure functions of tensors."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def distance(pred: Tensor, target: Tensor, kind: str = "mse", huber_c: float = 1e-3) -> Tensor:
    """Mean MSE, or the pseudo-Huber sqrt(d^2 + c^2) - c of LCM/PCM, over all elements."""
    d2 = (pred.float() - target.float()) ** 2
    if kind == "mse":
        return d2.mean()
    if kind == "huber":
        return (torch.sqrt(d2 + huber_c ** 2) - huber_c).mean()
    raise ValueError(f"loss kind must be 'mse' or 'huber', got {kind!r}")


def tscd_terms(pred: Tensor, target: Tensor, w_mse: float = 1.0, kind: str = "mse", huber_c: float = 1e-3,
               w_adv: float = 0.0, adversarial: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Eq. 14's terms, weighted: {"mse": w_mse * MSE (or Huber), "adv": w_adv * adversarial(pred, target)} between
    Psi(x_tn, eps_theta, t_n -> t_end) and Psi(x_hat_tprev, eps_ema, t_prev -> t_end). The adversarial hook is
    the generator side of a discriminator loss (present where w_adv > 0)."""
    terms = {"mse": w_mse * distance(pred, target.detach(), kind, huber_c)}
    if w_adv > 0:
        if adversarial is None:
            raise ValueError("w_adv > 0 needs an adversarial hook (a discriminator); none is configured")
        terms["adv"] = w_adv * adversarial(pred, target.detach())
    return terms


def tscd_loss(*args, **kwargs) -> Tensor:
    """Eq. 14's distance d = the sum of `tscd_terms`."""
    return sum(tscd_terms(*args, **kwargs).values())
