"""How much a world leaves for distillation to fix: the exact-score teacher's trailing deterministic sampler (DDIM
for VP worlds, Euler for flow worlds) at few steps against its many-step error, both to the exact guided-ODE
endpoint from the same noise.

With the exact score the only error left is the sampler's, so these ratios say whether few-step sampling is
clearly wrong in a world (it must be, for distillation to have something to do) before any network is fitted.
"""
from __future__ import annotations

import torch

from ..diffusion.grid import trailing
from ..diffusion.schedule import NoiseSchedule
from ..names import LAB_WORLDS
from .ode import exact_endpoint
from .teacher import lab_scheduler
from .world import LabWorld, lab_world

STEPS = (1, 2, 4, 8, 25)


def exact_ddim(world: LabWorld, x_T: torch.Tensor, labels: torch.Tensor, w: float, steps: int,
               family: str = "vp") -> torch.Tensor:
    """The trailing k-step deterministic sampler with the exact CFG output: DDIM (vp, the lab's diffusers schedule,
    final alpha-bar 1) or Euler on the shifted sigmas shift(1), shift((k-1)/k), ..., shift(1/k) (flow)."""
    sch = lab_scheduler(family)
    schedule = NoiseSchedule.from_scheduler(sch)
    if family == "vp":
        sch.set_timesteps(steps)
        ts = [*sch.timesteps.tolist(), -1]  # -1: the final, clean alpha-bar
    else:
        ts = [*reversed(trailing(schedule.T, steps)), -1]  # index t carries sigma = shift((t + 1) / T)
    x = x_T.double()
    for t, s in zip(ts[:-1], ts[1:]):
        a, sigma = (c.flatten() for c in schedule.coeffs(torch.full((len(x),), t), x))
        x = schedule.jump(x, world.cfg_out(x, a, sigma, labels, w, family), torch.full((len(x),), t),
                          torch.full((len(x),), s))
    return x


def headroom(world: LabWorld, guidance: float = 3.0, per_class: int = 16, seed: int = 0) -> dict[int, float]:
    """{steps: MSE per dimension of the exact-output trailing sampler to the exact ODE endpoint} for STEPS."""
    family = LAB_WORLDS.get(world.name, "vp")
    labels = torch.arange(world.n_classes).repeat_interleave(per_class)
    x_T = torch.randn(len(labels), *world.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = exact_endpoint(world, x_T, labels, guidance, NoiseSchedule.from_scheduler(lab_scheduler(family)), steps=100)
    return {n: ((exact_ddim(world, x_T, labels, guidance, n, family) - ref) ** 2).mean().item() for n in STEPS}


def worlds_table(guidance: float = 3.0) -> str:
    """Markdown: each named world, its size, and its exact-score headroom."""
    lines = [f"Exact-output trailing sampler (DDIM for vp, Euler for flow), CFG {guidance:g}: MSE per dimension to "
             f"the exact ODE endpoint", "",
             "| World | Family | Classes x modes | Shape | sigma | " + " | ".join(f"{n} steps" for n in STEPS)
             + " | 4 / 25 | 8 / 25 |", "|---|---|---|---|---|" + "---|" * (len(STEPS) + 2)]
    for name in LAB_WORLDS:
        world = lab_world(name)
        err = headroom(world, guidance)
        lines.append(f"| {name} | {LAB_WORLDS[name]} | {world.n_classes} x {world.n_modes} | "
                     f"{'x'.join(map(str, world.shape))} | {world.sigma:g} | "
                     + " | ".join(f"{err[n]:.4f}" for n in STEPS)
                     + f" | {err[4] / err[25]:.1f}x | {err[8] / err[25]:.1f}x |")
    return "\n".join(lines) + "\n"
