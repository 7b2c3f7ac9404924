"""The flow-matching lab world (digits-flow): the digits mixture under the rectified-flow path, its exact velocity
and exact ODE, its headroom, the shipped SD3-transformer teacher, and the whole plan on it through the same CLI."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from hsd.diffusion.schedule import NoiseSchedule
from hsd.lab.evaluate import sample
from hsd.lab.headroom import exact_ddim, headroom
from hsd.lab.ode import exact_endpoint, exact_flow_ode
from hsd.lab.teacher import lab_scheduler, load_teacher, teacher_path
from hsd.lab.world import lab_world

ROOT = Path(__file__).resolve().parent.parent
FLOW = "digits-flow"


@pytest.fixture(scope="module")
def world():
    return lab_world(FLOW)


def _noised(world, sigma, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % world.n_classes
    x0 = world.sample(labels, g)
    return (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64), labels


def test_exact_velocity_is_eps_minus_x0(world):
    """v = E[eps | x] - E[x0 | x] from the VP-form posterior at a = 1 - sigma, s = sigma; at sigma = 1 it is x minus
    the class's prior mean, with no division by a = 0."""
    for sigma in (0.05, 0.5, 0.9):
        x, labels = _noised(world, sigma)
        a, s = (torch.full((len(x),), v, dtype=torch.float64) for v in (1 - sigma, sigma))
        v = world.velocity(x, a, s, labels)
        assert torch.allclose(v, world.eps(x, a, s, labels) - world.posterior_mean(x, a, s, labels), atol=1e-12)
        x0 = x - sigma * v  # the schedule's split recovers the posterior mean
        assert torch.allclose(x0, world.posterior_mean(x, a, s, labels), atol=1e-12)
    x, labels = _noised(world, 1.0)
    v = world.velocity(x, torch.zeros(len(x)), torch.ones(len(x)), labels)
    assert torch.isfinite(v).all()
    assert torch.allclose(v, x - world.means[labels].mean(1), atol=1e-12)


def test_exact_flow_ode_converges_and_euler_reaches_it(world):
    labels = torch.arange(10)
    x1 = torch.randn(10, *world.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = exact_flow_ode(world, x1, labels, 3.0, steps=400)
    assert ((exact_flow_ode(world, x1, labels, 3.0, steps=100) - ref) ** 2).mean() < 1e-12  # RK4, far past need
    errs = [((exact_ddim(world, x1, labels, 3.0, n, "flow") - ref) ** 2).mean().item() for n in (25, 200)]
    assert errs[1] < errs[0] / 4  # Euler: first order on the shifted grid, converging to the same endpoint
    sched = NoiseSchedule.from_scheduler(lab_scheduler("flow"))
    assert torch.equal(exact_endpoint(world, x1, labels, 3.0, sched, steps=100),
                       exact_flow_ode(world, x1, labels, 3.0, steps=100))


def test_flow_world_has_headroom(world):
    """As for digits (issue 21): exact-velocity Euler at 4 steps >= 5x its 25-step trajectory error, 8 steps >= 2x."""
    err = headroom(world)
    print({n: round(e, 5) for n, e in err.items()}, f"4/25 {err[4] / err[25]:.2f}x, 8/25 {err[8] / err[25]:.2f}x")
    assert err[4] >= 5 * err[25] and err[8] >= 2 * err[25] and err[1] > 5 * err[4]


def test_exact_euler_is_diffusers_flow_match_euler(world):
    """The headroom's exact sampler is diffusers' FlowMatchEulerDiscreteScheduler on the trailing sigmas, given the
    exact velocity: the lab's flow sampler and the oracle agree step for step."""
    labels = torch.arange(10)
    x1 = torch.randn(10, *world.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for k in (1, 2, 4, 8):
        sch = lab_scheduler("flow")
        sch.set_timesteps(sigmas=[1 - j / k for j in range(k)])
        x = x1.clone()
        for t in sch.timesteps:
            sigma = float(t) / 1000
            x = sch.step(world.cfg_out(x, 1 - sigma, sigma, labels, 3.0, "flow"), t, x).prev_sample.double()
        assert torch.allclose(x, exact_ddim(world, x1, labels, 3.0, k, "flow"), atol=1e-5), k


def test_shipped_flow_teacher():
    """diffusers' own SD3 transformer with SD3's scheduler, shipped small, carrying its world; its own 25-step
    Euler lands near the exact ODE (closer than its 4-step sampler does)."""
    folder = teacher_path(FLOW)
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 5e6
    teacher = load_teacher(folder)
    assert isinstance(teacher.unet, SD3Transformer2DModel) and teacher.family == "flow"
    assert isinstance(teacher.scheduler, FlowMatchEulerDiscreteScheduler) and teacher.scheduler.config.shift == 3.0
    world = teacher.world
    assert world.name == FLOW and torch.equal(world.means, lab_world(FLOW).means)
    labels = torch.arange(10).repeat_interleave(16)
    x1 = torch.randn(len(labels), *world.shape, generator=torch.Generator().manual_seed(0))
    emb = teacher.encode(world.prompts + [""])
    cond = {k: v[labels] for k, v in emb.items()}
    uncond = {k: v[-1:].expand(len(labels), *v.shape[1:]) for k, v in emb.items()}
    ref = exact_flow_ode(world, x1.double(), labels, 3.0, steps=100)
    err = {n: ((sample(teacher.unet, FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler.config), x1, cond,
                       uncond, 3.0, n).double() - ref) ** 2).mean().item() for n in (4, 25)}
    print(err)  # docs/flow.md: 0.152 at 4 steps, 0.084 at 25 (the digits UNet's 25-step DDIM: 0.033)
    assert err[25] < err[4] and err[25] < 0.1


def test_flow_lab_end_to_end(tmp_path):
    """`hsd lab lab.world=digits-flow` runs TSCD 8->4->2->1, the feedback LoRA and DMD on the transformer teacher
    through the same modules and writes the table, with Euler rows where the VP world has DDIM, TCD and LCM."""
    args = [sys.executable, "-m", "hsd.cli", "lab", f"lab.world={FLOW}", f"out_dir={tmp_path}", "name=flow",
            "lab.eval_per_class=4", "tscd.batch_size=8", "trainer.progress_bar=false",
            "tscd.stages=[{k: 8, iterations: 2}, {k: 4, iterations: 2}, {k: 2, iterations: 2}, {k: 1, iterations: 2}]",
            "feedback.iterations=2", "feedback.batch_size=8", "feedback.merge_weights=[0.0, 1.0]",
            "dmd.iterations=2", "dmd.batch_size=8"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "flow" / "table.csv")))
    samplers = {x["scheduler"] for x in rows}
    assert {"Euler trailing", "Euler trailing, CFG 3", "Euler stochastic", "Euler one step t=800"} <= samplers
    assert not any("DDIM" in s or "TCD" in s or "LCM" in s for s in samplers)
    assert [x["model"] for x in rows if x["model"].startswith("TSCD stage")] == [f"TSCD stage k={k}" for k in
                                                                                  (8, 4, 2, 1)]
    assert rows[-1]["model"] == "DMD one-step LoRA (t=800)"
    assert all(float(x["traj_err"]) >= 0 for x in rows if int(x["steps"]))
