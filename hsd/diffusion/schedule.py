"""Noise schedule as plain tensors: alpha-bar lookup, noising and parametrisation conversions.

Conventions: x_t = a_t * x0 + s_t * eps with a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t).
Timesteps are integer indices into the diffusers scheduler's `alphas_cumprod` (T = 1000 for SD);
t < 0 means "past the last step", i.e. the scheduler's `final_alpha_cumprod` (1.0 when set_alpha_to_one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: Tensor  # [T] float64
    final_alpha_cumprod: float

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """Read alpha-bar from any diffusers scheduler (DDIM, TCD, LCM: they share the config)."""
        final = getattr(scheduler, "final_alpha_cumprod", scheduler.alphas_cumprod[0])
        return cls(scheduler.alphas_cumprod.double().clone(), float(final))

    @property
    def T(self) -> int:
        return self.alphas_cumprod.numel()

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha-bar at integer timesteps t (any shape); t < 0 gives the final alpha-bar."""
        t = torch.as_tensor(t, dtype=torch.long)
        acp = self.alphas_cumprod.to(t.device)
        final = torch.full_like(acp[:1], self.final_alpha_cumprod)
        return torch.where(t >= 0, acp[t.clamp(min=0)], final[0])

    def coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(a_t, s_t) shaped [B, 1, ..., 1] to broadcast against `like` [B, ...], in its dtype."""
        ab = self.alpha_bar(t).reshape(-1, *([1] * (like.dim() - 1)))
        return ab.sqrt().to(like), (1 - ab).sqrt().to(like)


def add_noise(x0: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return a * x0 + s * eps


def eps_to_x0(x_t: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return (x_t - s * eps) / a


def x0_to_eps(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return (x_t - a * x0) / s


def v_to_eps(x_t: Tensor, v: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """v = a * eps - s * x0 (Salimans & Ho), so eps = s * x_t + a * v when a^2 + s^2 = 1."""
    return s * x_t + a * v


def eps_to_v(x_t: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return a * eps - s * eps_to_x0(x_t, eps, a, s)


def renoise(sched: NoiseSchedule, x: Tensor, t_from: Tensor, t_to: Tensor, noise: Tensor) -> Tensor:
    """Sample q(x_to | x_from) for t_to >= t_from: x_to = sqrt(r) x + sqrt(1 - r) noise, r = abar_to / abar_from."""
    shape = (-1, *([1] * (x.dim() - 1)))
    r = (sched.alpha_bar(t_to) / sched.alpha_bar(t_from)).clamp(max=1).reshape(shape)
    return r.sqrt().to(x) * x + (1 - r).sqrt().to(x) * noise
