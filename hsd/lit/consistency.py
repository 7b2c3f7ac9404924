"""Algorithm 1's training pair, shared by TSCD (every stage) and DMD (its consistency term): the student's
prediction and the target, both projected to t_end (Eq. 14), from one batch and one generator."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..data.batch import Batch
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.segments import ddim_grid, sample_times
from ..diffusion.solvers import NetFn, teacher_step, with_guidance

if TYPE_CHECKING:
    from ..config import TSCD


def with_empty_prompts(cond, uncond, empty: Tensor):
    """cond with the samples where `empty` [B] is true replaced by the empty prompt's conditioning (tensors, or
    SDXL's dicts of them)."""
    if isinstance(cond, dict):
        return {key: with_empty_prompts(cond[key], uncond[key], empty) for key in cond}
    return torch.where(empty.reshape(-1, *([1] * (cond.dim() - 1))).to(cond.device), uncond.expand_as(cond), cond)


class ConsistencyPair:
    """(prediction, target, draws) for k segments on the N-step grid, with the TSCD section's settings.

    guided: the teacher's step applies CFG with w ~ U[guidance_min, guidance_max] (Eq. 3). Off when the settings
    preserve CFG (tscd.cfg_solver = false) and when the teacher is a distilled stage, whose guidance is already
    folded in.
    """

    def __init__(self, schedule: NoiseSchedule, k: int, grid_steps: int, cfg: TSCD, guided: bool = True):
        self.schedule, self.k, self.cfg = schedule, k, cfg
        self.guided = guided and cfg.cfg_solver
        self.grid = ddim_grid(schedule.T, grid_steps)  # CPU: times are drawn with a CPU generator

    def __call__(self, batch: Batch, g: torch.Generator, student: NetFn, teacher: NetFn,
                 target: NetFn) -> tuple[Tensor, Tensor, dict]:
        c = self.cfg
        x0, cond, uncond = batch["x0"], batch["cond"], batch["uncond"]
        B, dev = x0.shape[0], x0.device
        ts = sample_times(self.grid, self.k, self.schedule.T, B, g, c.t_end)
        t_n, t_prev, t_end = (v.to(dev) for v in (ts.t_n, ts.t_prev, ts.t_end))
        noise = torch.randn(x0.shape, generator=g).to(x0)
        if c.offset_noise:
            noise = noise + c.offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=g).to(x0)
        w = c.guidance_min + (c.guidance_max - c.guidance_min) * torch.rand(B, generator=g)
        # a guidance-embedded student (FLUX.1-dev) is told the w its teacher runs at; other conds are unchanged
        cond, uncond = with_guidance(cond, w.to(dev)), with_guidance(uncond, w.to(dev))
        if c.empty_prompts:  # PCM's proportion_empty_prompts: the student also learns the unconditional flow
            cond = with_empty_prompts(cond, uncond, torch.rand(B, generator=g) < c.empty_prompts)
        x_tn = self.schedule.noise(x0, noise, t_n)
        with torch.no_grad():
            if self.guided:
                x_prev = teacher_step(self.schedule, teacher, x_tn, t_n, t_prev, cond, uncond, w.to(dev))
            else:
                x_prev = self.schedule.jump(x_tn, teacher(x_tn, t_n, cond), t_n, t_prev)
            tgt = self.schedule.jump(x_prev, target(x_prev, t_prev, cond), t_prev, t_end)
        pred = self.schedule.jump(x_tn, student(x_tn, t_n, cond), t_n, t_end)
        return pred, tgt, {"x_tn": x_tn, "t_n": t_n, "t_prev": t_prev, "t_end": t_end, "w": w, "cond": cond}
