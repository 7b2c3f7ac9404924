"""Human-feedback losses (Hyper-SD §3.2) as pure functions of reward tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reward_hinge(rewards: dict[str, Tensor], margins: dict[str, float],
                 weights: dict[str, float] | None = None) -> Tensor:
    """Eq. 15: sum_d w_d * mean_b ReLU(alpha_d - r_d(x'_0, c)); zero once every reward clears its margin.

    rewards: name -> (B,) scores; margins: name -> alpha_d; weights: name -> w_d (default 1). ReFL's setting
    is a margin of 2 and a weight of 1e-3 on ImageReward.
    """
    missing = set(rewards) - set(margins)
    if missing:
        raise ValueError(f"no margin for rewards {sorted(missing)}")
    weights = weights or {}
    terms = [weights.get(d, 1.0) * F.relu(margins[d] - r).mean() for d, r in rewards.items()]
    return torch.stack(terms).sum()
