"""The teacher's classifier-free-guided step (Hyper-SD Eq. 3) on either family (hsd.diffusion.schedule).

A network function maps (x_t [B,...], t [B], cond) to the network's output: eps for VP, the velocity for flow.
CFG combines outputs linearly; since eps and x0 are affine in the output at a fixed (x_t, t), guiding the output
is guiding eps (and x0) with the same w, in both families.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .schedule import NoiseSchedule

# net_fn(x_t [B,...], t [B], cond) -> the network's output [B,...]
NetFn = Callable[[Tensor, Tensor, object], Tensor]


def cfg(out_uncond: Tensor, out_cond: Tensor, w: Tensor | float) -> Tensor:
    """Classifier-free guidance u + w (c - u); Hyper-SD's (1 + omega) form is w = 1 + omega."""
    if isinstance(w, Tensor):
        w = w.reshape(-1, *([1] * (out_cond.dim() - 1))).to(out_cond)
    return out_uncond + w * (out_cond - out_uncond)


def guided(net_fn: NetFn, x_t: Tensor, t: Tensor, cond, uncond, w) -> Tensor:
    """Cond and uncond in one batched forward (half the kernel launches of two calls)."""
    both = net_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(uncond, cond))
    out_u, out_c = both.chunk(2)
    return cfg(out_u, out_c, w)


def teacher_step(sched: NoiseSchedule, net_fn: NetFn, x_t: Tensor, t: Tensor, s: Tensor, cond, uncond, w) -> Tensor:
    """x_hat_s: the teacher's guided deterministic step t -> s (Eq. 3; DDIM for VP, Euler for flow)."""
    return sched.jump(x_t, guided(net_fn, x_t, t, cond, uncond, w), t, s)


def cat_cond(a, b):
    """Concatenate conditioning along the batch: tensors, or dicts of tensors (SDXL added conds)."""
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b])
