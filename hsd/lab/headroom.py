"""How much a world leaves for distillation to fix: the exact-score teacher's DDIM-trailing trajectory error at
few steps against its many-step error, both to the exact guided-ODE endpoint from the same noise.

With the exact score the only error left is the sampler's, so these ratios say whether few-step sampling is
clearly wrong in a world (it must be, for distillation to have something to do) before any network is fitted.
"""
from __future__ import annotations

import torch

from ..diffusion.schedule import NoiseSchedule
from .ode import exact_ode
from .teacher import lab_scheduler
from .world import WORLD_BUILDERS, LabWorld

STEPS = (1, 2, 4, 8, 25)


def exact_ddim(world: LabWorld, x_T: torch.Tensor, labels: torch.Tensor, w: float, steps: int) -> torch.Tensor:
    """DDIM trailing with the exact CFG eps (the lab's diffusers schedule, final alpha-bar 1)."""
    sch = lab_scheduler()
    sch.set_timesteps(steps)
    schedule = NoiseSchedule.from_scheduler(sch)
    ts = [*sch.timesteps.tolist(), -1]  # -1: the final, clean alpha-bar
    x = x_T.double()
    for t, s in zip(ts[:-1], ts[1:]):
        a, sigma = (c.flatten() for c in schedule.coeffs(torch.full((len(x),), t), x))
        x = schedule.jump(x, world.cfg_eps(x, a, sigma, labels, w), torch.full((len(x),), t),
                          torch.full((len(x),), s))
    return x


def headroom(world: LabWorld, guidance: float = 3.0, per_class: int = 16, seed: int = 0) -> dict[int, float]:
    """{steps: MSE per dimension of exact-score DDIM trailing to the exact ODE endpoint} for STEPS."""
    labels = torch.arange(world.n_classes).repeat_interleave(per_class)
    x_T = torch.randn(len(labels), *world.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = exact_ode(world, x_T, labels, guidance, float(lab_scheduler().alphas_cumprod[-1]), steps=100)
    return {n: ((exact_ddim(world, x_T, labels, guidance, n) - ref) ** 2).mean().item() for n in STEPS}


def worlds_table(guidance: float = 3.0) -> str:
    """Markdown: each named world, its size, and its exact-score headroom."""
    lines = [f"Exact-score DDIM trailing, CFG {guidance:g}: MSE per dimension to the exact ODE endpoint", "",
             "| World | Classes x modes | Shape | sigma | " + " | ".join(f"{n} steps" for n in STEPS)
             + " | 4 / 25 | 8 / 25 |", "|---|---|---|---|" + "---|" * (len(STEPS) + 2)]
    for name, build in WORLD_BUILDERS.items():
        world = build()
        err = headroom(world, guidance)
        lines.append(f"| {name} | {world.n_classes} x {world.n_modes} | {'x'.join(map(str, world.shape))} | "
                     f"{world.sigma:g} | " + " | ".join(f"{err[n]:.4f}" for n in STEPS)
                     + f" | {err[4] / err[25]:.1f}x | {err[8] / err[25]:.1f}x |")
    return "\n".join(lines) + "\n"
