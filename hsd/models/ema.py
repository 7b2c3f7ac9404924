"""Exponential moving average of a set of named parameters, kept as buffers (saved in checkpoints)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA(nn.Module):
    def __init__(self, params: dict[str, Tensor]):
        super().__init__()
        self.names = list(params)
        for n, p in params.items():
            self.register_buffer(_key(n), p.detach().clone())

    @torch.no_grad()
    def update(self, params: dict[str, Tensor], decay: float) -> None:
        """theta_ema <- decay * theta_ema + (1 - decay) * theta."""
        for n in self.names:
            e = getattr(self, _key(n))
            e.copy_(decay * e + (1 - decay) * params[n].detach())

    @torch.no_grad()
    def copy_from(self, params: dict[str, Tensor]) -> None:
        for n in self.names:
            getattr(self, _key(n)).copy_(params[n])

    def tensors(self) -> dict[str, Tensor]:
        return {n: getattr(self, _key(n)) for n in self.names}


def _key(name: str) -> str:
    return name.replace(".", "__")
