"""Exact probability-flow ODEs of the lab world (VP and rectified flow), solved far past sampling accuracy.

In y = x / a and u = s / a the PF-ODE of a VP model is dy/du = eps(a y; a, s) (DDIM is its Euler
method). We run classic RK4 on a grid geometric in u, then a last step to u = 0 (clean data). The rectified-flow
ODE dx/dsigma = v(x, sigma) (Euler is its first-order method) runs RK4 in sigma from 1 to 0 (`exact_flow_ode`).
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

    return rk4(f, x_T.double() / _coeffs(us[0])[0], us)  # a = 1 at u = 0


def rk4(f, y: Tensor, grid: Tensor) -> Tensor:
    """Classic fourth-order Runge-Kutta for dy/dt = f(y, t) along the points of `grid` (hand-written: torchdiffeq is
    not a dependency, and the lab's ODEs need only this fixed-grid solver)."""
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        k1 = f(y, t0)
        k2 = f(y + h / 2 * k1, t0 + h / 2)
        k3 = f(y + h / 2 * k2, t0 + h / 2)
        k4 = f(y + h * k3, t1)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


def flow_grid(steps: int) -> Tensor:
    """sigma from 1 to 0 with steps that shrink quadratically towards sigma = 0, where the mixture's responsibilities
    settle (sigma = (1 - i / steps)^2): the grid of `exact_flow_ode`."""
    return (1 - torch.arange(steps + 1, dtype=torch.float64) / steps) ** 2


def exact_flow_ode(world: LabWorld, x_1: Tensor, labels: Tensor, w: float, steps: int = 200) -> Tensor:
    """Endpoint (sigma = 0) of the guided rectified-flow ODE dx/dsigma = v(x, sigma) started from pure noise x_1 at
    sigma = 1: classic RK4 on `flow_grid`. [B, ch, S, S] float64"""
    def f(x, sigma):
        return world.cfg_out(x, 1 - sigma, sigma, labels, w, "flow")

    return rk4(f, x_1.double(), flow_grid(steps))


def exact_endpoint(world: LabWorld, x_T: Tensor, labels: Tensor, w: float, schedule, steps: int = 100) -> Tensor:
    """The exact guided ODE's clean endpoint from x_T at the schedule's last timestep, for either family
    (hsd.diffusion.schedule.NoiseSchedule): the VP ODE from its alpha-bar, or the flow ODE from sigma = 1."""
    if schedule.family == "vp":
        return exact_ode(world, x_T, labels, w, float(schedule.table[-1]), steps=steps)
    if float(schedule.table[-1]) != 1.0:
        raise ValueError(f"the flow ODE starts from sigma = 1 (pure noise); this schedule ends at "
                         f"{float(schedule.table[-1]):g}")
    return exact_flow_ode(world, x_T, labels, w, steps=steps)  # 100 steps: 1e-14 MSE to 1600 (docs/flow.md)
