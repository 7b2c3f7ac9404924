"""The lab's table, shaped like the paper's: rows = models x steps, columns = the four exact metrics."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..diffusion.solvers import guided_eps
from ..io import atomic_path
from ..pipelines.generate import recipe_scheduler
from .ode import exact_ode
from .teacher import Teacher
from .world import LabWorld, metrics

if TYPE_CHECKING:
    from ..config import Lab

COLUMNS = ["alignment", "fidelity", "traj_err", "coverage", "reward"]
HEADERS = ["Model", "Steps", "Scheduler", "Alignment ↑", "Fidelity (nats/dim) ↑", "Traj. error ↓", "Coverage ↑",
           "Reward (nats/dim) ↑"]


@dataclass
class Row:
    model: str
    steps: int
    scheduler: str
    values: dict[str, float]


@torch.no_grad()
def sample(unet, scheduler, x_T, cond, uncond=None, w: float = 1.0, steps: int = 1, timesteps=None, **step_kwargs):
    """A plain diffusers scheduler loop (`timesteps` overrides its spacing); CFG (one batched forward) when w != 1."""
    def eps_fn(x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    if timesteps:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        tt = t.expand(x.shape[0])
        eps = guided_eps(eps_fn, x, tt, cond, uncond, w) if w != 1 else eps_fn(x, tt, cond)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


class LabEvaluator:
    """Fixed eval noise, its exact ODE endpoints, and the metrics of any (UNet, scheduler, steps)."""

    def __init__(self, world: LabWorld, teacher: Teacher, cfg: Lab, seed: int = 1234):
        self.world, self.teacher, self.cfg = world, teacher, cfg
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(world.n_classes).repeat_interleave(cfg.eval_per_class)
        self.x_T = torch.randn(len(self.labels), *world.shape, generator=g)
        emb = teacher.encode(world.prompts + [""])
        self.cond, self.uncond = emb[self.labels], emb[-1:].expand(len(self.labels), -1, -1)
        ab_T = float(teacher.scheduler.alphas_cumprod[-1])
        self.reference = exact_ode(world, self.x_T, self.labels, cfg.eval_guidance, ab_T, steps=100).float()

    def row(self, name: str, unet, steps: int, kind: str, guided: bool = False,
            timestep: int | None = None) -> tuple[Row, torch.Tensor]:
        """kind: ddim (trailing), tcd (eta = cfg.tcd_eta) or lcm (one step at `timestep`, the one-step UNet's)."""
        sch, kw, ts = recipe_scheduler(kind, self.teacher.scheduler.config), {}, None
        if kind == "ddim":
            label = "DDIM trailing"
        elif kind == "tcd":
            kw = {"eta": self.cfg.tcd_eta, "generator": torch.Generator().manual_seed(0)}
            label = f"TCD eta={self.cfg.tcd_eta}"
        else:
            ts, label = [timestep], f"LCM t={timestep}"
        w = self.cfg.eval_guidance if guided else 1.0
        x = sample(unet, sch, self.x_T, self.cond, self.uncond, w, steps, ts, **kw)
        label += f", CFG {w:g}" if guided else ""
        return Row(name, steps, label, metrics(self.world, x, self.labels, self.reference)), x


def write_table(rows: list[Row], out: Path, title: str = "") -> str:
    """Markdown (returned and saved) and CSV of the rows."""
    out.mkdir(parents=True, exist_ok=True)
    fmt = {"alignment": "{:.3f}", "fidelity": "{:.3f}", "traj_err": "{:.4f}", "coverage": "{:.3f}", "reward": "{:.3f}"}
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(HEADERS) + " |",
                                                        "|" + "---|" * len(HEADERS)]
    for r in rows:
        vals = [fmt[c].format(r.values[c]) for c in COLUMNS]
        lines.append(f"| {r.model} | {r.steps} | {r.scheduler} | " + " | ".join(vals) + " |")
    md = "\n".join(lines) + "\n"
    with atomic_path(out / "table.md") as tmp:
        Path(tmp).write_text(md)
    with atomic_path(out / "table.csv") as tmp, open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["model", "steps", "scheduler", *COLUMNS])
        for r in rows:
            wr.writerow([r.model, r.steps, r.scheduler, *[r.values[c] for c in COLUMNS]])
    return md

