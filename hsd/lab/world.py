"""The lab worlds: analytic Gaussian mixtures of small image-shaped tensors with text prompts.

Each class (a prompt, "the digit three") owns M modes; every mode is an isotropic Gaussian N(mu, sigma^2 I) in
[-1, 1]^(ch x S x S). Everything the paper measures with learned proxies is exact here: the noised marginals are
mixtures too, so the score (hence eps, CFG and the probability-flow ODE) and the data log-likelihood have closed
forms. Computation is float64.

Worlds by name (`lab_world`; the names in hsd.names.LAB_WORLDS, their mixtures in `WORLD_BUILDERS`): `digits`
(the default: 8x8 handwritten digits shipped inside scikit-learn, ten classes, 16 k-means modes each: real image
structure, close modes, headroom for few-step sampling), `blocks` (4 colour blocks x 4 positions, well separated:
the fast smoke world) and `digits-flow` (the digits mixture under the rectified-flow path, with a transformer
teacher: docs/flow.md). A world is saved beside its fitted teacher (`world.safetensors`), so a teacher always
carries the exact world it was fitted to.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..names import LAB_WORLDS

COLOURS = {"red": (0.9, -0.7, -0.7), "green": (-0.7, 0.9, -0.7), "blue": (-0.7, -0.7, 0.9),
           "yellow": (0.9, 0.9, -0.7)}
BACKGROUND = -0.3
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class LabWorld:
    means: Tensor        # [C, M, ch, S, S] float64: mode means, class-major
    sigma: float         # every mode's standard deviation
    prompts: list[str]   # one per class
    name: str = "custom"

    @property
    def n_classes(self) -> int:
        return self.means.shape[0]

    @property
    def n_modes(self) -> int:
        return self.means.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.means.shape[2:])

    @property
    def size(self) -> int:
        return self.means.shape[-1]

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Clean data x0 [B, ch, S, S] for class labels [B] (modes uniform within the class)."""
        modes = torch.randint(self.n_modes, labels.shape, generator=generator)
        noise = torch.randn(len(labels), *self.shape, generator=generator, dtype=torch.float64)
        return self.means[labels, modes] + self.sigma * noise

    def _components(self, labels: Tensor | None, batch: int) -> Tensor:
        """Means [B, K, D] of the mixture a sample may come from: its class's modes, or all (uncond)."""
        flat = self.means.flatten(2)  # [C, M, D]
        if labels is None:
            return flat.flatten(0, 1).expand(batch, -1, -1)
        return flat[labels]

    def _posterior(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None):
        """Posterior mean of the mode mean, sum_k r_k mu_k [B, D], and (a, s, var = a^2 sigma^2 + s^2) as [B, 1],
        with r_k the responsibilities of the noised mixture at x_t (distances by matrix products: fast at K = 160)."""
        B = x.shape[0]
        xf = x.double().flatten(1)                      # [B, D]
        a, s = _col(a, B), _col(s, B)                   # [B, 1]
        var = a ** 2 * self.sigma ** 2 + s ** 2
        a_in = torch.where(a > 0, a, 1.0)               # a = 0 (flow's sigma = 1): x_t says nothing of the mode,
        #                                                 sq = 0 below and the responsibilities are uniform
        if labels is None:
            mu = self.means.flatten(2).flatten(0, 1)    # [K, D], shared by the batch
            sq = torch.cdist(xf / a_in, mu) ** 2 * a ** 2  # |x - a mu|^2 = a^2 |x / a - mu|^2
            return (-sq / (2 * var)).softmax(-1) @ mu, a, s, var
        mu = self._components(labels, B)                # [B, M, D]
        sq = (torch.cdist((xf / a_in)[:, None], mu) ** 2)[:, 0] * a ** 2
        return torch.bmm((-sq / (2 * var)).softmax(-1)[:, None], mu)[:, 0], a, s, var

    def posterior_mean(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        """E[x0 | x_t] for x_t = a x0 + s eps; a, s as [B] or scalars; labels None = unconditional."""
        mbar, a, _, var = self._posterior(x, a, s, labels)
        shrink = a * self.sigma ** 2 / var
        return ((1 - a * shrink) * mbar + shrink * x.double().flatten(1)).view_as(x)

    def eps(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        """Exact eps = (x_t - a E[x0|x_t]) / s = s (x_t - a sum_k r_k mu_k) / var: finite as s -> 0."""
        mbar, a, s, var = self._posterior(x, a, s, labels)
        return (s / var * (x.double().flatten(1) - a * mbar)).view_as(x)

    def velocity(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        """Exact rectified-flow velocity E[eps - x0 | x_t] (x_t = (1 - sigma) x0 + sigma eps: a = 1 - sigma,
        s = sigma); finite at both ends: at sigma = 1 it is x_t minus the prior mean."""
        mbar, a, s, var = self._posterior(x, a, s, labels)
        xf = x.double().flatten(1)
        shrink = a * self.sigma ** 2 / var
        return (s / var * (xf - a * mbar) - (1 - a * shrink) * mbar - shrink * xf).view_as(x)

    def out(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None, family: str = "vp") -> Tensor:
        """The exact network output of a family (hsd.diffusion.schedule): eps (vp) or the velocity (flow)."""
        return self.eps(x, a, s, labels) if family == "vp" else self.velocity(x, a, s, labels)

    def cfg_out(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor, w: float | Tensor,
                family: str = "vp") -> Tensor:
        """Exact classifier-free guided output u + w (c - u): eps (vp) or velocity (flow), which is affine in eps
        at a fixed x_t, so both guide the same sample."""
        ou, oc = self.out(x, a, s, None, family), self.out(x, a, s, labels, family)
        w = torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return ou + w * (oc - ou)

    def cfg_eps(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor, w: float | Tensor) -> Tensor:
        """Exact classifier-free guided eps: eps_u + w (eps_c - eps_u)."""
        return self.cfg_out(x, a, s, labels, w, "vp")

    # ---- exact densities ----
    def sq_dist(self, x: Tensor) -> Tensor:
        """Squared distance [B, C * M] from each sample to every mode mean (class-major order)."""
        return torch.cdist(x.double().flatten(1), self.means.flatten(2).flatten(0, 1)) ** 2

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_data(x) per sample [B] under the whole (unconditional) mixture."""
        return self._mixture_log_prob(self.sq_dist(x))

    def class_log_prob(self, x: Tensor, labels: Tensor) -> Tensor:
        """log p_data(x | class) per sample [B]: the lab's exact, differentiable reward for feedback learning
        (divide by `dim` for nats/dim, the log-likelihood column's scale)."""
        diff = x.double().flatten(1)[:, None] - self._components(labels, len(x))
        return self._mixture_log_prob((diff ** 2).sum(-1))

    def _mixture_log_prob(self, sq_dist: Tensor) -> Tensor:
        """log of an equal-weight mixture of N(mu_k, sigma^2 I), from squared distances [B, K] to its means."""
        return (torch.logsumexp(-sq_dist / (2 * self.sigma ** 2), -1) - math.log(sq_dist.shape[-1])
                - 0.5 * self.dim * math.log(2 * math.pi * self.sigma ** 2))

    def nearest_mode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(class, mode) of the nearest mode mean, each [B]."""
        idx = self.sq_dist(x).argmin(-1)
        return idx // self.n_modes, idx % self.n_modes

    # ---- persistence: a teacher folder carries its world ----
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        save_file({"means": self.means.contiguous()}, str(path),
                  metadata={"sigma": repr(self.sigma), "prompts": json.dumps(self.prompts), "name": self.name})

    @classmethod
    def load(cls, path: str | Path) -> LabWorld:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            return cls(f.get_tensor("means").double(), float(meta["sigma"]), json.loads(meta["prompts"]),
                       meta.get("name", "custom"))


def _col(v, B: int) -> Tensor:
    """A scalar or [B] (or [B, 1, 1, 1]) coefficient as [B, 1]."""
    return torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1).expand(B, 1)


def blocks_world(size: int = 8, sigma: float = 0.1) -> LabWorld:
    """The smoke world: a half-size coloured block in each quadrant on a grey background, 4 colours x 4 places,
    modes far apart (few-step DDIM is already nearly right here: 4 vs 25 steps differ 3.8x)."""
    h = size // 2
    means = torch.full((len(COLOURS), 4, 3, size, size), BACKGROUND, dtype=torch.float64)
    for c, rgb in enumerate(COLOURS.values()):
        for m, (i, j) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
            means[c, m, :, i:i + h, j:j + h] = torch.tensor(rgb, dtype=torch.float64)[:, None, None]
    return LabWorld(means, sigma, [f"a {c} block" for c in COLOURS], "blocks")


def kmeans(x: Tensor, k: int, iters: int = 100, seed: int = 0) -> Tensor:
    """Centroids [k, D] of x [N, D]: k-means++ seeding, then Lloyd's iterations (deterministic for a seed).
    Hand-written: a dozen lines, and scikit-learn's KMeans may change its results between versions."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randint(len(x), (1,), generator=g)]
    while len(c) < k:
        d2 = torch.cdist(x, c).min(1).values ** 2
        c = torch.cat([c, x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        c = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
    return c


def digits_world(modes: int = 16, sigma: float = 0.25) -> LabWorld:
    """The headroom world: scikit-learn's 1,797 8x8 handwritten digits (its bundled copy of the UCI set) scaled
    to [-1, 1], each digit's images summarised by `modes` k-means centroids. sigma = 0.25 is the real residual
    spread around 16 centroids (0.22): the modes are smooth, low-rank digit shapes, close to one another, and the
    exact-score DDIM error at 4 steps is several times its 25-step error (`hsd lab-worlds`)."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float64) / 8 - 1  # pixel values 0..16
    y = torch.tensor(data.target)
    means = torch.stack([kmeans(x[y == c].flatten(1), modes, seed=c) for c in range(10)])
    return LabWorld(means.view(10, modes, 1, 8, 8), sigma, [f"the digit {d}" for d in DIGITS], "digits")


WORLD_BUILDERS = {"digits": digits_world, "blocks": blocks_world}  # the mixtures, by name


def lab_world(name: str) -> LabWorld:
    """Any named lab world (hsd.names.LAB_WORLDS): its mixture is the name before "-flow" (a flow world is that
    data under the rectified-flow path; the family is its teacher's)."""
    if name not in LAB_WORLDS:
        raise ValueError(f"unknown lab world {name!r}; known: {', '.join(LAB_WORLDS)}")
    world = WORLD_BUILDERS[name.removesuffix("-flow")]()
    world.name = name
    return world
