"""TSCD time grid and segments (Hyper-SD §3.1, Algorithm 1, Eq. 13)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import trailing


def ddim_grid(T: int, N: int) -> Tensor:
    """The teacher's N-step DDIM grid, ascending: T/N - 1, 2T/N - 1, ..., T - 1 (trailing spacing)."""
    return torch.tensor(trailing(T, N), dtype=torch.long)


def segment_length(T: int, k: int) -> int:
    return math.ceil(T / k)


def segment_start(t: Tensor, k: int, T: int) -> Tensor:
    """Eq. 13: t_b = floor(t / ceil(T/k)) * ceil(T/k)."""
    L = segment_length(T, k)
    return torch.div(t, L, rounding_mode="floor") * L


@dataclass
class SegmentTimes:
    t_n: Tensor    # [B] student's timestep (a grid point)
    t_prev: Tensor  # [B] where the teacher's step lands: max(t_{n-1}, t_b)
    t_b: Tensor    # [B] segment start (Eq. 13)
    t_end: Tensor  # [B] where both sides are projected, in [t_b, t_prev]


def sample_times(grid: Tensor, k: int, T: int, batch: int, generator: torch.Generator | None = None,
                 t_end: str = "uniform") -> SegmentTimes:
    """Algorithm 1: t_n from the grid, t_b by Eq. 13, t_end ~ U{t_b, ..., t_prev}.

    The teacher step t_n -> t_{n-1} is clipped at the segment start, so a target never leaves its
    segment. t_end="boundary" fixes t_end = t_b (k = 1 then gives plain CD, t_end = 0).
    """
    prev = torch.cat([grid.new_tensor([-1]), grid[:-1]])
    valid = grid > segment_start(grid, k, T)  # a grid point on a boundary has nothing to learn
    grid, prev = grid[valid], prev[valid]
    idx = torch.randint(len(grid), (batch,), generator=generator)
    t_n = grid[idx]
    t_b = segment_start(t_n, k, T)
    t_prev = torch.maximum(prev[idx], t_b)
    if t_end == "uniform":
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        end = t_b + (u * (t_prev - t_b + 1)).floor().long()
    elif t_end == "boundary":
        end = t_b.clone()
    else:
        raise ValueError(f"t_end must be 'uniform' or 'boundary', got {t_end!r}")
    return SegmentTimes(t_n, t_prev, t_b, end)


def inference_timesteps(T: int, steps: int) -> Tensor:
    """Timesteps a k-step TSCD student is sampled at: DDIM trailing, one per segment start."""
    return ddim_grid(T, steps).flip(0)

