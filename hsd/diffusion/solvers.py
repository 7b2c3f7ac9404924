"""The teacher's classifier-free-guided step (Hyper-SD Eq. 3) on either family (hsd.diffusion.schedule).

A network function maps (x_t [B,...], t [B], cond) to the network's output: eps for VP, the velocity for flow.
CFG combines outputs linearly; since eps and x0 are affine in the output at a fixed (x_t, t), guiding the output
is guiding eps (and x0) with the same w, in both families. A guidance-distilled teacher (FLUX.1-dev) is instead
told w through its guidance embedding, in one forward (what its pipeline does, and FastGen's FLUX DMD2).
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
    """The guided output: cond and uncond in one batched forward (half the kernel launches of two calls); for a
    guidance-distilled denoiser (FLUX.1-dev, whose cond carries `guidance`) one forward told w instead."""
    if embeds_guidance(cond):
        return net_fn(x_t, t, with_guidance(cond, w))
    both = net_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(uncond, cond))
    out_u, out_c = both.chunk(2)
    return cfg(out_u, out_c, w)


def embeds_guidance(cond) -> bool:
    """Whether the conditioning feeds a guidance embedding (FLUX.1-dev) rather than two-forward CFG."""
    return isinstance(cond, dict) and "guidance" in cond


def with_guidance(cond, w: Tensor | float):
    """cond with its guidance input set to w (a number or one per sample); a cond without one is returned as is."""
    if not embeds_guidance(cond):
        return cond
    g = cond["guidance"]
    return {**cond, "guidance": torch.broadcast_to(torch.as_tensor(w, dtype=g.dtype, device=g.device), g.shape)}


def teacher_step(sched: NoiseSchedule, net_fn: NetFn, x_t: Tensor, t: Tensor, s: Tensor, cond, uncond, w) -> Tensor:
    """x_hat_s: the teacher's guided deterministic step t -> s (Eq. 3; DDIM for VP, Euler for flow)."""
    return sched.jump(x_t, guided(net_fn, x_t, t, cond, uncond, w), t, s)


def index_cond(cond, index):
    """cond[index] along the batch, for a tensor or a dict of tensors (expand with `expand_cond`)."""
    if isinstance(cond, dict):
        return {k: index_cond(v, index) for k, v in cond.items()}
    return cond[index]


def expand_cond(cond, batch: int):
    """A batch-1 conditioning broadcast to `batch` rows (a view), for a tensor or a dict of tensors."""
    if isinstance(cond, dict):
        return {k: expand_cond(v, batch) for k, v in cond.items()}
    return cond.expand(batch, *cond.shape[1:])


def cat_cond(a, b):
    """Concatenate conditioning along the batch: tensors, or dicts of tensors (SDXL added conds)."""
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b])
