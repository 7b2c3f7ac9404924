"""Discriminator / generator losses over lists of logit maps (one per feature level), as pure functions."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _mean(logits: list[Tensor], fn) -> Tensor:
    return sum(fn(l).mean() for l in logits) / len(logits)


def d_loss(real: list[Tensor], fake: list[Tensor], kind: str = "hinge") -> Tensor:
    """Hinge: E relu(1 - D(real)) + E relu(1 + D(fake)). Non-saturating: E softplus(-D(real)) + E softplus(D(fake))."""
    if kind == "hinge":
        return _mean(real, lambda l: F.relu(1 - l)) + _mean(fake, lambda l: F.relu(1 + l))
    if kind == "ns":
        return _mean(real, lambda l: F.softplus(-l)) + _mean(fake, F.softplus)
    raise ValueError(f"adversarial loss must be 'hinge' or 'ns', got {kind!r}")


def g_loss(fake: list[Tensor], kind: str = "hinge") -> Tensor:
    """Hinge: -E D(fake). Non-saturating: E softplus(-D(fake))."""
    if kind == "hinge":
        return _mean(fake, lambda l: -l)
    if kind == "ns":
        return _mean(fake, lambda l: F.softplus(-l))
    raise ValueError(f"adversarial loss must be 'hinge' or 'ns', got {kind!r}")
