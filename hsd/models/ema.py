"""Exponential moving average of a set of named parameters, kept as buffers (saved in checkpoints)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA(nn.Module):
    def __init__(self, params: dict[str, Tensor]):
        super().__init__()
        self.names = list(params)
        self._checked = False
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

    def tensors_for(self, module: nn.Module) -> dict[str, Tensor]:
        """`tensors()`, after checking that every name resolves to a tensor of module the way
        torch.func.functional_call resolves it (attribute by attribute, so FSDP1's wrappers, which forward
        attribute access to the module they wrap, resolve too). functional_call with strict=False (needed: the EMA
        holds the LoRA tensors only) ignores unknown names, so a renamed key would silently make the target the
        online student."""
        if not self._checked:
            unknown = [n for n in self.names if not _resolves(module, n)]
            if unknown:
                raise KeyError(f"EMA target: {len(unknown)} of {len(self.names)} tensors are not parameters of "
                               f"the network it replaces (first: {unknown[0]!r})")
            self._checked = True
        return self.tensors()


def _resolves(module: nn.Module, name: str) -> bool:
    path, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        return False
    return isinstance(getattr(owner, leaf, None), Tensor)


def _key(name: str) -> str:
    return name.replace(".", "__")
