"""The DDIM solver Psi and the teacher's classifier-free-guided step (Hyper-SD Eq. 3)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .schedule import NoiseSchedule, eps_to_x0

# eps_fn(x_t [B,...], t [B], cond) -> eps [B,...]
EpsFn = Callable[[Tensor, Tensor, object], Tensor]


def ddim(x_t: Tensor, eps: Tensor, a_t: Tensor, s_t: Tensor, a_s: Tensor, s_s: Tensor) -> Tensor:
    """Psi(x_t, eps, t -> s) = a_s * x0_hat + s_s * eps: deterministic DDIM, any s <= t (s = t is identity)."""
    return a_s * eps_to_x0(x_t, eps, a_t, s_t) + s_s * eps


def ddim_step(sched: NoiseSchedule, x_t: Tensor, eps: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """Psi on integer timesteps t -> s (each [B]); s < 0 lands on the final (clean) alpha."""
    a_t, s_t = sched.coeffs(t, x_t)
    a_s, s_s = sched.coeffs(s, x_t)
    return ddim(x_t, eps, a_t, s_t, a_s, s_s)


def cfg(eps_uncond: Tensor, eps_cond: Tensor, w: Tensor | float) -> Tensor:
    """Classifier-free guidance eps_u + w (eps_c - eps_u); Hyper-SD's (1 + omega) form is w = 1 + omega."""
    if isinstance(w, Tensor):
        w = w.reshape(-1, *([1] * (eps_cond.dim() - 1))).to(eps_cond)
    return eps_uncond + w * (eps_cond - eps_uncond)


def guided_eps(eps_fn: EpsFn, x_t: Tensor, t: Tensor, cond, uncond, w) -> Tensor:
    """Cond and uncond in one batched forward (half the kernel launches of two calls)."""
    both = eps_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(uncond, cond))
    eps_u, eps_c = both.chunk(2)
    return cfg(eps_u, eps_c, w)


def teacher_step(sched: NoiseSchedule, eps_fn: EpsFn, x_t: Tensor, t: Tensor, s: Tensor,
                 cond, uncond, w) -> Tensor:
    """x_hat_s = Psi(x_t, eps_cfg, t -> s): the teacher's guided DDIM step (Eq. 3)."""
    return ddim_step(sched, x_t, guided_eps(eps_fn, x_t, t, cond, uncond, w), t, s)


def cat_cond(a, b):
    """Concatenate conditioning along the batch: tensors, or dicts of tensors (SDXL added conds)."""
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b])
