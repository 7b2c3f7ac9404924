import math

import torch

from hsd.diffusion.schedule import NoiseSchedule
from hsd.lab.metrics import metrics
from hsd.lab.ode import exact_ode
from hsd.lab.teacher import lab_scheduler


def _log_pt(world, x, a, s, labels):
    """log p_t(x) of the noised class mixture, written independently of LabWorld.eps."""
    mu = world.means[labels].flatten(2)  # [B, M, D]
    var = a ** 2 * world.sigma ** 2 + s ** 2
    quad = -((x.flatten(1)[:, None] - a * mu) ** 2).sum(-1) / (2 * var)
    return torch.logsumexp(quad, -1) - 0.5 * world.dim * math.log(2 * math.pi * var)


def test_exact_eps_is_minus_s_times_score(world):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])
    a, s = 0.6, 0.8
    x = (a * world.sample(labels, g) + s * torch.randn(4, *world.shape, generator=g, dtype=torch.float64))
    x.requires_grad_(True)
    score = torch.autograd.grad(_log_pt(world, x, a, s, labels).sum(), x)[0]
    assert torch.allclose(world.eps(x.detach(), a, s, labels), -s * score, atol=1e-10)


def test_many_step_psi_reaches_exact_ode_endpoint(world):
    sched = NoiseSchedule.from_scheduler(lab_scheduler())
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat(4)
    x_T = torch.randn(16, *world.shape, generator=g, dtype=torch.float64)
    ref = exact_ode(world, x_T, labels, 3.0, float(sched.table[-1]), steps=100)
    errs = {}
    for n in (50, 1000):
        ts = torch.linspace(999, 0, n).round().long().tolist() + [-1]
        x = x_T.clone()
        for t, s in zip(ts[:-1], ts[1:]):
            a_t, s_t = sched.coeffs(torch.tensor([t]), x)
            eps = world.cfg_eps(x, a_t.flatten(), s_t.flatten(), labels, 3.0)
            x = sched.jump(x, eps, torch.full((16,), t), torch.full((16,), s))
        errs[n] = ((x - ref) ** 2).mean().item()
    assert errs[1000] < 1e-3 and errs[1000] < errs[50] / 5, errs  # DDIM = Euler: converges to the ODE


def test_metrics_on_data_and_on_blur(world):
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(4).repeat_interleave(32)
    x = world.sample(labels, g)
    m = metrics(world, x, labels, references={"traj_err": x})
    # Data: perfect alignment and coverage, loglik = -0.5 log(2 pi sigma^2) - 0.5 up to sampling noise.
    assert m["alignment"] == 1.0 and m["coverage"] == 1.0 and m["traj_err"] == 0.0
    assert abs(m["loglik"] - (-0.5 * math.log(2 * math.pi * 0.01) - 0.5)) < 0.02
    blur = world.means[labels].mean(1)  # the average of a class's modes: what 1-step DDIM makes
    assert metrics(world, blur, labels)["loglik"] < -4


def test_class_log_prob_is_the_lab_reward(world):
    """log p(x) = logsumexp_c log p(x | c) - log C (uniform classes); the reward prefers the prompt's class
    and its gradient points at the class's modes."""
    labels = torch.arange(4).repeat(4)
    x = world.sample(labels, torch.Generator().manual_seed(0))
    per_class = torch.stack([world.class_log_prob(x, torch.full_like(labels, c)) for c in range(4)], -1)
    assert torch.allclose(torch.logsumexp(per_class, -1) - math.log(4), world.log_prob(x), atol=1e-9)
    assert (per_class.argmax(-1) == labels).all()
    blurred = (x + world.sample((labels + 1) % 4, torch.Generator().manual_seed(1))) / 2
    blurred.requires_grad_(True)
    world.class_log_prob(blurred, labels).sum().backward()
    moved = blurred.detach() + 1e-4 * blurred.grad
    assert (world.class_log_prob(moved, labels) > world.class_log_prob(blurred.detach(), labels)).all()
