"""The lab's table, shaped like the paper's: rows = models x steps x samplers, columns = the lab's metrics
(hsd.lab.metrics), with two reference rows that give every estimated metric its floor."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ..diffusion.schedule import NoiseSchedule, trailing_sigmas
from ..diffusion.solvers import expand_cond, guided, index_cond
from ..models.denoisers import denoiser_out
from ..io import atomic_path
from ..pipelines.recipes import recipe_scheduler
from .metrics import Truth, metrics
from .ode import exact_endpoint
from .teacher import Teacher
from .world import LabWorld

if TYPE_CHECKING:
    from ..config import Lab

# (column, header, format): distributional metrics first, the per-sample exact ones after.
COLUMNS = [("alignment", "Align ↑", "{:.3f}"), ("coverage", "Cover ↑", "{:.3f}"), ("precision", "Prec ↑", "{:.3f}"),
           ("recall", "Recall ↑", "{:.3f}"), ("dispersion", "Disp →1", "{:.2f}"), ("swd", "SWD data ↓", "{:.3f}"),
           ("swd_ode", "SWD ODE ↓", "{:.3f}"), ("mmd", "MMD² ↓", "{:.4f}"), ("traj_err", "Traj ODE ↓", "{:.4f}"),
           ("traj_teacher", "Traj teacher ↓", "{:.4f}"), ("loglik", "Log-lik ↑*", "{:.2f}"),
           ("reward", "Reward ↑", "{:.2f}")]
REFERENCE_MODELS = ("Data (exact samples)", "Exact ODE (other noise)")
TRAILING = ("DDIM trailing", "Euler trailing")  # the deterministic k-step sampler's label: vp, flow


@dataclass
class Row:
    model: str
    steps: int          # 0: a reference row (no sampler)
    scheduler: str
    values: dict[str, float]


@torch.no_grad()
def sample(unet, scheduler, x_T, cond, uncond=None, w: float = 1.0, steps: int = 1, timesteps=None, **step_kwargs):
    """A plain diffusers scheduler loop (`timesteps` overrides its spacing: timesteps for VP schedulers, sigmas
    before the shift for flow-matching ones); CFG (one batched forward) when w != 1."""
    def out_fn(x, t, c):
        return denoiser_out(unet, x, t, c)

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):  # trailing k-step sigmas, FLUX's pipeline default
        scheduler.set_timesteps(sigmas=timesteps or trailing_sigmas(steps))
    elif timesteps:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        tt = t.expand(x.shape[0])
        out = guided(out_fn, x, tt, cond, uncond, w) if w != 1 else out_fn(x, tt, cond)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def lab_sampler(kind: str, scheduler, timestep: int | None = None):
    """(diffusers scheduler, its sigmas or timesteps override or None) for a recipe kind.
    VP: the release's recipes (hsd.pipelines.recipes.recipe_scheduler). Flow, where diffusers has no TCD or LCM:
    ddim -> Euler on the trailing sigmas (the deterministic jump); tcd -> Euler with stochastic sampling (x0, then
    fresh noise at the next sigma: the consistency multistep sampler, TCD at eta = 1); lcm -> one Euler step to
    clean data from the sigma of index `timestep` (what the one-step generator was trained at)."""
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return recipe_scheduler(kind, scheduler.config), [timestep] if kind == "lcm" else None
    T = scheduler.config.num_train_timesteps
    sch = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, stochastic_sampling=kind == "tcd")
    return sch, [(timestep + 1) / T] if kind == "lcm" else None


def eval_seeds(seed: int) -> dict[str, int]:
    """Independent seeds of the evaluation set's three draws (the evaluation noise, the exact sets behind the
    distances with their projection directions, TCD's re-noising) from one evaluation seed (ours): runs with
    the same seed share the set, so arms compare paired by seed, and the spread over seeds includes its draw."""
    import numpy as np

    states = np.random.SeedSequence([seed, 0x4C4142]).generate_state(3)  # 0x4C4142: "LAB", a fixed salt
    return dict(zip(("noise", "truth", "tcd"), (int(v) for v in states)))


class LabEvaluator:
    """The evaluation set of one seed (noise, labels, exact truth sets: `eval_seeds`); its exact ODE endpoints;
    what exact data looks like (`Truth`); and the metrics of any (UNet, scheduler, steps). `teacher_reference`
    (the teacher's many-step solve from the same noise) is set by the first teacher row and adds the traj_teacher
    column to every row after it."""

    def __init__(self, world: LabWorld, teacher: Teacher, cfg: Lab, seed: int = 0):
        self.world, self.teacher, self.cfg = world, teacher, cfg
        self.seeds = eval_seeds(seed)
        g = torch.Generator().manual_seed(self.seeds["noise"])
        self.labels = torch.arange(world.n_classes).repeat_interleave(cfg.eval_per_class)
        self.x_T = torch.randn(len(self.labels), *world.shape, generator=g)
        emb = teacher.encode(world.prompts + [""])
        self.cond, self.uncond = index_cond(emb, self.labels), expand_cond(index_cond(emb, [-1]), len(self.labels))
        self.schedule = NoiseSchedule.from_scheduler(teacher.scheduler)
        self.ode = self.exact(self.x_T)
        self.truth = Truth.measure(world, self.labels, seed=self.seeds["truth"])
        self.teacher_reference: torch.Tensor | None = None
        self._generator = g

    def exact(self, x_T: torch.Tensor) -> torch.Tensor:
        """Endpoints of the exact guided PF-ODE (CFG = eval_guidance) from x_T, float32."""
        return exact_endpoint(self.world, x_T, self.labels, self.cfg.eval_guidance, self.schedule, steps=100).float()

    def measure(self, x: torch.Tensor) -> dict[str, float]:
        refs = {"ode": self.ode, "traj_err": self.ode}
        if self.teacher_reference is not None:
            refs["traj_teacher"] = self.teacher_reference
        return metrics(self.world, x, self.labels, self.truth, refs)

    def reference_rows(self) -> list[tuple[Row, torch.Tensor]]:
        """Exact data and the exact ODE from other noise: each estimated metric's value for a perfect sampler
        (its floor from finite samples) and, for precision and recall, the ceiling."""
        g = self._generator
        data = self.world.sample(self.labels, g).float()
        ode = self.exact(torch.randn(self.x_T.shape, generator=g))
        rows = []
        for name, x in zip(REFERENCE_MODELS, (data, ode)):
            values = {k: v for k, v in self.measure(x).items() if not k.startswith("traj")}  # other noise
            rows.append((Row(name, 0, "exact", values), x))
        return rows

    def row(self, name: str, unet, steps: int, kind: str, guided: bool = False,
            timestep: int | None = None) -> tuple[Row, torch.Tensor]:
        """kind: ddim (trailing), tcd (eta = cfg.tcd_eta) or lcm (one step at `timestep`, the one-step UNet's)."""
        (sch, ts), kw = lab_sampler(kind, self.teacher.scheduler, timestep), {}
        flow = self.teacher.family == "flow"
        if kind == "ddim":
            label = TRAILING[flow]
        elif kind == "tcd":
            kw = {"generator": torch.Generator().manual_seed(self.seeds["tcd"])}
            if not flow:
                kw["eta"] = self.cfg.tcd_eta
            label = "Euler stochastic" if flow else f"TCD eta={self.cfg.tcd_eta}"
        else:
            label = f"Euler one step t={timestep}" if flow else f"LCM t={timestep}"
        w = self.cfg.eval_guidance if guided else 1.0
        x = sample(unet, sch, self.x_T, self.cond, self.uncond, w, steps, ts, **kw)
        label += f", CFG {w:g}" if guided else ""
        return Row(name, steps, label, self.measure(x)), x


def _cell(row: Row, column: str, fmt: str) -> str:
    v = row.values.get(column)
    return "—" if v is None or math.isnan(v) else fmt.format(v)


def write_table(rows: list[Row], out: Path, title: str = "") -> str:
    """Markdown (returned and saved as table.md) and CSV (table.csv, every column, blank where not defined)."""
    out.mkdir(parents=True, exist_ok=True)
    heads = ["Model", "Steps", "Sampler", *(h for _, h, _ in COLUMNS)]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [_cell(r, c, f) for c, _, f in COLUMNS]
        lines.append(f"| {r.model} | {r.steps or '—'} | {r.scheduler} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n" + LEGEND
    with atomic_path(out / "table.md") as tmp:
        Path(tmp).write_text(md)
    with atomic_path(out / "table.csv") as tmp, open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["model", "steps", "scheduler", *(c for c, _, _ in COLUMNS)])
        for r in rows:
            wr.writerow([r.model, r.steps, r.scheduler, *(r.values.get(c, "") for c, _, _ in COLUMNS)])
    return md


LEGEND = """
Prec/Recall: typical-set precision and 3-NN recall against exact data; Disp: nearest-mode spread over the true
spread (1 = right, 0 = collapse); SWD data / ODE: sliced W2 to exact data / to the exact guided ODE from the same
noise; MMD²: unbiased, to exact data; Traj ODE / teacher: MSE per dimension to the exact ODE endpoint / to the
teacher's own many-step solve from the same noise (deterministic samplers only). The two "exact" rows are what a
perfect sampler from independent noise scores (each estimate's sampling floor); SWD ODE of a deterministic sampler
from the same noise can go below it, to 0 at the exact ODE. *Log-lik is maximised by collapse onto mode centres.
"""
