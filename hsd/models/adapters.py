"""The one owner of a UNet's named peft LoRAs: which run, which train, and scopes that put both back.

A UNet in hsd carries up to four adapters: the TSCD LoRA (peft's "default"; DMD's LoRA generator trains it
further), the feedback LoRA, the fake-score LoRA and, when later TSCD stages distil the previous one, that one. Every stage declares which adapters are active and which of
them it trains; everything else reads the UNet through a scope (`scope`, `off` = the frozen teacher, `restoring`)
that restores the previous state on exit. This module is the only place that switches peft adapters.

Why not peft's own switches: `set_adapter`/`enable_adapters` mark every active adapter trainable, so a frozen TSCD
LoRA under a trained feedback LoRA would collect gradients (which leak into a later stage's first step), and
diffusers' `add_adapter` makes the new adapter the only active one. Here activity and trainability are set apart.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..errors import ConfigError
from . import lora as lora_io
from .denoisers import lora_prefix

TSCD, FEEDBACK, FAKE = "default", "feedback", "fake"  # the TSCD LoRA keeps peft's default name
PREVIOUS = "previous"  # the previous TSCD stage's LoRA, frozen, as the teacher (tscd.teacher = previous)


def _tuner_layers(unet) -> list[BaseTunerLayer]:
    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def _lora_flags(unet) -> list[tuple[torch.nn.Parameter, bool]]:
    """Each LoRA tensor with its trainable flag, by object: names change when FSDP wraps the UNet."""
    return [(p, p.requires_grad) for n, p in unet.named_parameters() if "lora_" in n]


@contextmanager
def _restored(unet) -> Iterator[None]:
    """Put back each layer's active adapters, the on/off switch and every LoRA tensor's trainable flag. A layer
    made inside (an adapter on modules no earlier one covers) runs the adapters that ran before, which it lacks."""
    layers = {id(layer): (list(layer.active_adapters), layer.disable_adapters) for layer in _tuner_layers(unet)}
    running = next(iter(layers.values()), ([], False))
    flags = _lora_flags(unet)
    try:
        yield
    finally:
        for layer in _tuner_layers(unet):
            names, disabled = layers.get(id(layer), running)
            layer.set_adapter(names, inference_mode=True)
            layer.enable_adapters(not disabled)
        for p, trainable in flags:
            p.requires_grad_(trainable)


def use(unet, active: Iterable[str], trained: Iterable[str] = ()) -> None:
    """Run the UNet with the `active` adapters summed; only the `trained` ones' tensors require gradients."""
    active, trained = list(active), tuple(trained)
    for layer in _tuner_layers(unet):
        layer.enable_adapters(True)
        layer.set_adapter(active, inference_mode=True)
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.requires_grad_(any(f".{a}." in n for a in trained))


@contextmanager
def scope(unet, active: Iterable[str], trained: Iterable[str] = ()) -> Iterator[None]:
    """Context: `use(active, trained)`, the previous state restored on exit."""
    with _restored(unet):
        use(unet, active, trained)
        yield


@contextmanager
def off(unet) -> Iterator[None]:
    """Context: the frozen base UNet (every adapter off), the previous state restored on exit."""
    with _restored(unet):
        for layer in _tuner_layers(unet):
            layer.enable_adapters(False)
        yield


def add(unet, name: str, rank: int, alpha: float, targets: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A zero-initialised adapter (B = 0) beside the existing ones, in fp32, frozen until a stage trains it; which
    adapters run is left as it was. The first adapter freezes the base UNet."""
    with _restored(unet):
        try:
            params = lora_io.add_adapter(unet, name, rank, alpha, targets)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise ConfigError(f"lora.targets {targets}: {str(e).splitlines()[0]}") from e
    for p in params.values():
        p.data = p.data.float()  # trained in fp32 even when the frozen weights are bf16
        p.requires_grad_(False)
    return params


class Adapters:
    """A UNet's named LoRAs: attach, load, save, run and train them by name, and the teacher (all off).

    Holds only the UNet (under FSDP, the wrapped one once a stage has wrapped it): peft's layers keep the state.
    """

    def __init__(self, unet):
        self.unet = unet

    @property
    def names(self) -> list[str]:
        return sorted({n for layer in _tuner_layers(self.unet) for n in layer.lora_A})

    def attach(self, name: str, rank: int, alpha: float, targets: list[str] | None = None,
               init: str | os.PathLike = "") -> dict[str, torch.Tensor]:
        """A new adapter: zeros (the student starts as the teacher) or, with `init`, shaped like that LoRA file and
        holding its weights (e.g. a released Hyper-SD LoRA to train on). The first one becomes the active one."""
        first = not self.names
        if first:
            self.unet.requires_grad_(False)  # the base weights never train through an adapter
        if init:
            with _restored(self.unet):
                params = lora_io.load_lora_adapter(self.unet, init, name)
            for p in params.values():
                p.data = p.data.float()
        else:
            params = add(self.unet, name, rank, alpha, targets)
        if first:
            use(self.unet, [name], [name])
        return params

    def params(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """LoRA tensors by plain module path: one adapter's, or every adapter's."""
        return lora_io.lora_params(self.unet, name)

    def load(self, path: str | Path, name: str = TSCD) -> None:
        lora_io.load_lora(self.unet, path, adapter=name)

    def save(self, path: Path, name: str, metadata: dict[str, str]) -> None:
        """The adapter in the diffusers layout at `path` and, for a UNet, in the kohya layout beside it
        (.kohya.safetensors; SD3 and FLUX LoRAs are exchanged in the diffusers layout, as the release's are)."""
        lora_io.save_lora(path, self.unet, metadata, adapter=name)
        if lora_prefix(self.unet) == lora_io.PREFIX:
            lora_io.save_lora(path.with_suffix(".kohya.safetensors"), self.unet, metadata, fmt="kohya", adapter=name)

    def use(self, active: Iterable[str], trained: Iterable[str] = ()) -> None:
        use(self.unet, active, trained)

    def scope(self, active: Iterable[str], trained: Iterable[str] = ()):
        return scope(self.unet, active, trained)

    def off(self):
        """Context: the frozen teacher."""
        return off(self.unet)

    def restoring(self):
        """Context: whatever runs inside (a whole stage) leaves the adapters' state as it found it."""
        return _restored(self.unet)

    def fused(self, weights: dict[str, float] | None = None):
        """A plain (peft-free) copy of the base UNet with the named adapters fused at {adapter: weight}."""
        return lora_io.plain_unet(self.unet, weights)

    def trained_copy(self, weights: dict[str, float], checkpointing: bool = False):
        """A fused copy that trains in full (DMD's full generator or fake score): fp32, trainable, with gradient
        checkpointing when the model's is on (sharded under FSDP by the strategy)."""
        unet = self.fused(weights).float().requires_grad_(True)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        return unet
