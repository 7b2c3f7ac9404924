"""The lab world: an analytic Gaussian mixture of small image-shaped tensors with text prompts.

Each class (a prompt, "a red block") owns M modes (where the block sits); every mode is an isotropic
Gaussian N(mu, sigma^2 I) in [-1, 1]^(3 x S x S). Everything the paper measures with learned proxies is
exact here: the noised marginals are mixtures too, so the score (hence eps, CFG and the probability-flow
ODE) and the data log-likelihood have closed forms. Computation is float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

COLOURS = {"red": (0.9, -0.7, -0.7), "green": (-0.7, 0.9, -0.7), "blue": (-0.7, -0.7, 0.9),
           "yellow": (0.9, 0.9, -0.7)}
BACKGROUND = -0.3


def _block_means(size: int) -> Tensor:
    """[C=4, M=4, 3, S, S]: a half-size coloured block in each quadrant on a grey background."""
    h = size // 2
    means = torch.full((len(COLOURS), 4, 3, size, size), BACKGROUND, dtype=torch.float64)
    for c, rgb in enumerate(COLOURS.values()):
        for m, (i, j) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
            means[c, m, :, i:i + h, j:j + h] = torch.tensor(rgb, dtype=torch.float64)[:, None, None]
    return means


@dataclass
class LabWorld:
    size: int = 8
    sigma: float = 0.1

    def __post_init__(self):
        self.means = _block_means(self.size)  # [C, M, 3, S, S]
        self.prompts = [f"a {c} block" for c in COLOURS]

    @property
    def n_classes(self) -> int:
        return self.means.shape[0]

    @property
    def n_modes(self) -> int:
        return self.means.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    @property
    def dim(self) -> int:
        return 3 * self.size * self.size

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Clean data x0 [B, 3, S, S] for class labels [B] (modes uniform within the class)."""
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
        """Responsibilities [B, K, 1], means mu [B, K, D], x - a mu and variance a^2 sigma^2 + s^2."""
        B = x.shape[0]
        xf = x.double().flatten(1)[:, None]  # [B, 1, D]
        a, s = _col(a, B), _col(s, B)        # [B, 1, 1]
        mu = self._components(labels, B)
        diff = xf - a * mu
        var = a ** 2 * self.sigma ** 2 + s ** 2
        resp = (-(diff ** 2).sum(-1, keepdim=True) / (2 * var)).softmax(1)
        return resp, mu, diff, var, a, s

    def posterior_mean(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        """E[x0 | x_t] for x_t = a x0 + s eps; a, s as [B] or scalars; labels None = unconditional."""
        resp, mu, diff, var, a, _ = self._posterior(x, a, s, labels)
        return (resp * (mu + a * self.sigma ** 2 / var * diff)).sum(1).view_as(x)

    def eps(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        """Exact eps = (x_t - a E[x0|x_t]) / s = sum_k r_k s (x_t - a mu_k) / var: finite as s -> 0."""
        resp, _, diff, var, _, s = self._posterior(x, a, s, labels)
        return (resp * s / var * diff).sum(1).view_as(x)

    def cfg_eps(self, x: Tensor, a: Tensor, s: Tensor, labels: Tensor, w: float | Tensor) -> Tensor:
        """Exact classifier-free guided eps: eps_u + w (eps_c - eps_u)."""
        eu, ec = self.eps(x, a, s, None), self.eps(x, a, s, labels)
        w = torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return eu + w * (ec - eu)

    # ---- exact metrics ----
    def _sq_dist(self, x: Tensor) -> Tensor:
        """Squared distance [B, K] from each sample to every mode mean (class-major order)."""
        return ((x.double().flatten(1)[:, None] - self.means.flatten(2).flatten(0, 1)[None]) ** 2).sum(-1)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_data(x) per sample [B] under the whole (unconditional) mixture."""
        return self._mixture_log_prob(self._sq_dist(x))

    def class_log_prob(self, x: Tensor, labels: Tensor) -> Tensor:
        """log p_data(x | class) per sample [B]: the lab's exact, differentiable reward for feedback learning
        (divide by `dim` for nats/dim, the fidelity metric's scale)."""
        diff = x.double().flatten(1)[:, None] - self._components(labels, len(x))
        return self._mixture_log_prob((diff ** 2).sum(-1))

    def _mixture_log_prob(self, sq_dist: Tensor) -> Tensor:
        """log of an equal-weight mixture of N(mu_k, sigma^2 I), from squared distances [B, K] to its means."""
        return (torch.logsumexp(-sq_dist / (2 * self.sigma ** 2), -1) - math.log(sq_dist.shape[-1])
                - 0.5 * self.dim * math.log(2 * math.pi * self.sigma ** 2))

    def nearest_mode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(class, mode) of the nearest mode mean, each [B]."""
        idx = self._sq_dist(x).argmin(-1)
        return idx // self.n_modes, idx % self.n_modes


def _col(v, B: int) -> Tensor:
    """A scalar or [B] coefficient as [B, 1, 1]."""
    return torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1, 1).expand(B, 1, 1)


def metrics(world: LabWorld, x: Tensor, labels: Tensor, x_ref: Tensor | None = None) -> dict[str, float]:
    """The four exact metrics, analogues of the paper's columns.

    alignment: share of samples whose nearest mode is of the prompt's class (CLIP score's role);
    fidelity: mean log p_data per dimension, nats (aesthetics' role: few-step blur falls off the modes);
    trajectory error: MSE per dimension to the exact ODE endpoint from the same noise;
    coverage: share of each class's modes that some correctly aligned sample reached, averaged;
    reward: mean log p_data(x | prompt's class) per dimension, the feedback stage's lab reward.
    """
    cls, mode = world.nearest_mode(x)
    hit = cls == labels
    cover = [len(set(mode[hit & (labels == c)].tolist())) / world.n_modes for c in labels.unique().tolist()]
    out = {"alignment": hit.double().mean().item(),
           "fidelity": (world.log_prob(x) / world.dim).mean().item(),
           "coverage": sum(cover) / len(cover),
           "reward": (world.class_log_prob(x, labels) / world.dim).mean().item()}
    if x_ref is not None:
        out["traj_err"] = ((x.double() - x_ref.double()) ** 2).mean().item()
    return out
