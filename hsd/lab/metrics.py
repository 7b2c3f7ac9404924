"""The lab's metrics: exact per-sample quantities, and distances between sample sets that collapse cannot win.

Per-sample, exact (the world's closed-form density and modes):
  alignment   share of samples whose nearest mode belongs to the prompt's class (CLIP score's role);
  coverage    share of each class's modes that some aligned sample reached, averaged over classes;
  loglik      mean log p_data(x) per dimension, nats. Honest name for what it is: it is *maximised by collapse*
              onto mode centres (a mode mean is the likeliest point), so it is no quality score on its own;
  reward      mean log p_data(x | prompt's class) per dimension: the feedback stage's lab reward;
  precision   share of samples in the typical set of their class: log p(x | c) inside the central 98 % of its
              law under exact data of class c. Blur (too unlikely) and collapse (too likely) both fall outside;
  dispersion  mean squared distance to the nearest mode over its value for exact data (1 = the true spread,
              0 = collapse onto centres, > 1 = samples between modes);
  traj_err    MSE per dimension to a reference from the same noise (the exact ODE endpoint, or the teacher's own
              many-step solve: `traj_teacher`). Meaningful for deterministic samplers only.
Set against exact samples of the same labels (estimates: their floor is the value of an independent exact set,
the table's "Data" and "Exact ODE" rows):
  swd, swd_ode  sliced Wasserstein-2 distance to exact data / to the guided-ODE pushforward of the same noise;
  mmd           unbiased squared MMD to exact data; Gaussian kernels at 0.5, 1, 2 x the within-mode distance
                sigma sqrt(2 D) (sensitive to spread) and at the data's median distance (to where the modes are);
  recall        share of exact data samples inside some sample's 3-NN ball (Kynkaenniemi et al., 2019).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .world import LabWorld

BETTER = {"alignment": "max", "coverage": "max", "loglik": "max", "reward": "max", "precision": "max",
          "recall": "max", "dispersion": "one", "traj_err": "min", "traj_teacher": "min", "swd": "min",
          "swd_ode": "min", "mmd": "min"}
DISTRIBUTIONAL = ["swd", "swd_ode", "mmd", "precision", "recall", "dispersion"]


def flat(x: Tensor) -> Tensor:
    return x.double().flatten(1)


def sliced_w2(x: Tensor, y: Tensor, directions: Tensor) -> float:
    """Sliced Wasserstein-2 between equal-size sets x, y [N, ...] along unit directions [P, D]: the root mean over
    directions of the 1-D W2^2 (sorted projections, the exact 1-D optimal coupling)."""
    px, py = (flat(x) @ directions.T).sort(0).values, (flat(y) @ directions.T).sort(0).values
    return ((px - py) ** 2).mean().sqrt().item()


def mmd2(x: Tensor, y: Tensor, bandwidths: list[float]) -> float:
    """Unbiased squared MMD between sets x [N, ...] and y [M, ...], a sum of Gaussian kernels of the given
    bandwidths. Exactly 0 in expectation for equal laws; may be slightly negative."""
    x, y = flat(x), flat(y)

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h ** 2)) for h in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    return ((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
            - 2 * kxy.mean()).item()


def knn_recall(x: Tensor, y: Tensor, k: int = 3) -> float:
    """Share of reference points y inside the union of balls around samples x of radius = distance to their k-th
    nearest other sample. Collapsed samples have radius 0 and cover nothing."""
    x, y = flat(x), flat(y)
    radius = torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # k + 1: the nearest is the point itself
    return (torch.cdist(y, x) <= radius[None]).any(1).double().mean().item()


def nearest_sq_dist(world: LabWorld, x: Tensor) -> Tensor:
    """Squared distance [B] to the nearest mode mean of any class."""
    return world.sq_dist(x).min(-1).values


@dataclass
class Truth:
    """What exact data looks like, measured once per evaluation (large Monte Carlo samples, seeded): the typical
    set of each class, the data's nearest-mode spread, a kernel bandwidth, and exact sets for the distances."""
    typical: Tensor        # [C, 2]: 1 % and 99 % quantiles of log p(x | c) under class c's data
    spread: float          # mean nearest-mode squared distance of exact data
    bandwidths: list[float]  # of the MMD kernels
    data: Tensor           # exact data samples with the evaluation's labels (the distance sets' target)
    directions: Tensor     # [P, D] unit directions of the sliced distance

    @classmethod
    def measure(cls, world: LabWorld, labels: Tensor, seed: int = 4321, per_class: int = 4096,
                projections: int = 256) -> Truth:
        g = torch.Generator().manual_seed(seed)
        many = torch.arange(world.n_classes).repeat_interleave(per_class)
        x = world.sample(many, g)
        lp = world.class_log_prob(x, many).view(world.n_classes, per_class)
        typical = torch.quantile(lp, torch.tensor([0.01, 0.99], dtype=torch.float64), dim=1).T
        spread = nearest_sq_dist(world, x).mean().item()
        sub = x[torch.randperm(len(x), generator=g)[:1024]]
        within = world.sigma * (2 * world.dim) ** 0.5
        bandwidths = [0.5 * within, within, 2 * within, torch.pdist(flat(sub)).median().item()]
        dirs = torch.randn(projections, world.dim, generator=g, dtype=torch.float64)
        return cls(typical, spread, bandwidths, world.sample(labels, g), dirs / dirs.norm(dim=1, keepdim=True))


def metrics(world: LabWorld, x: Tensor, labels: Tensor, truth: Truth | None = None,
            references: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Every metric of samples x [B, ...] for prompt classes labels [B]. `truth` adds the distributional ones;
    `references` {"traj_err": x_ref, "traj_teacher": x_ref, ...} trajectory errors to references from the same
    noise, and "ode" (the exact ODE endpoints) adds swd_ode."""
    cls, mode = world.nearest_mode(x)
    hit = cls == labels
    cover = [len(set(mode[hit & (labels == c)].tolist())) / world.n_modes for c in labels.unique().tolist()]
    class_lp = world.class_log_prob(x, labels)
    out = {"alignment": hit.double().mean().item(), "coverage": sum(cover) / len(cover),
           "loglik": (world.log_prob(x) / world.dim).mean().item(), "reward": (class_lp / world.dim).mean().item()}
    references = references or {}
    for name in ("traj_err", "traj_teacher"):
        if name in references:
            out[name] = ((x.double() - references[name].double()) ** 2).mean().item()
    if truth is not None:
        lo, hi = truth.typical[labels].unbind(-1)
        out["precision"] = ((class_lp >= lo) & (class_lp <= hi)).double().mean().item()
        out["recall"] = knn_recall(x, truth.data)
        out["dispersion"] = nearest_sq_dist(world, x).mean().item() / truth.spread
        out["swd"] = sliced_w2(x, truth.data, truth.directions)
        out["mmd"] = mmd2(x, truth.data, truth.bandwidths)
        if "ode" in references:
            out["swd_ode"] = sliced_w2(x, references["ode"], truth.directions)
    return out


def beats(metric: str, a: float, b: float) -> bool:
    """Whether value a is better than value b on `metric` (dispersion: nearer 1 on a log scale)."""
    if BETTER[metric] == "max":
        return a > b
    if BETTER[metric] == "min":
        return a < b
    return abs(math.log(max(a, 1e-12))) < abs(math.log(max(b, 1e-12)))
