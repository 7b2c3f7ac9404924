"""Exact probability-flow ODE of the lab world, solved far past sampling accuracy.

In y = x / a and u = s / a the PF-ODE of a VP model is dy/du = eps(a y; a, s) (DDIM is its Euler
method). We run classic RK4 on a grid geometric in u, then a last step to u = 0 (clean data).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .world import LabWorld


def _coeffs(u: Tensor) -> tuple[Tensor, Tensor]:
    a = (1 + u ** 2).rsqrt()
    return a, u * a


def exact_ode(world: LabWorld, x_T: Tensor, labels: Tensor, w: float, alpha_bar_T: float,
              steps: int = 400, u_min: float = 1e-3) -> Tensor:
    """Endpoint (u = 0) of the guided PF-ODE started from x_T at alpha-bar `alpha_bar_T`. [B, 3, S, S]"""
    u_T = ((1 - alpha_bar_T) / alpha_bar_T) ** 0.5
    us = torch.cat([torch.logspace(torch.log10(torch.tensor(u_T)), torch.log10(torch.tensor(u_min)),
                                   steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])

    def f(y, u):
        a, s = _coeffs(u)
        return world.cfg_eps(a * y, a, s, labels, w)

    y = x_T.double() / _coeffs(us[0])[0]
    for u0, u1 in zip(us[:-1], us[1:]):
        h = u1 - u0
        k1 = f(y, u0)
        k2 = f(y + h / 2 * k1, u0 + h / 2)
        k3 = f(y + h / 2 * k2, u0 + h / 2)
        k4 = f(y + h * k3, u1)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y  # a = 1 at u = 0
