"""peft LoRA on a diffusers UNet: attach, and save/load as safetensors in diffusers' key layout."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io import atomic_path

# Every linear/conv of SD's attention, feed-forward and resnet blocks, as PCM and LCM-LoRA train them.
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2"]
PREFIX = "unet."


class LoraFormatError(ValueError):
    pass


def attach_lora(unet, rank: int, alpha: float, targets: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Freeze the UNet, add a peft LoRA (B = 0, so the student starts as the teacher); return LoRA params."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or DEFAULT_TARGETS,
                                init_lora_weights=True))
    return lora_params(unet)


def lora_params(unet) -> dict[str, torch.Tensor]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def save_lora(path: str | os.PathLike, unet, metadata: dict[str, str] | None = None) -> Path:
    """diffusers layout ("unet.<module>.lora_A.weight"), written to a temp file and renamed into place."""
    state = {PREFIX + k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"format": "diffusers-lora", **(metadata or {})})
    return Path(path)


def load_lora(unet, path: str | os.PathLike) -> None:
    """Load a file saved by save_lora into the UNet's attached adapter (same rank and targets)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        state = load_file(path)
    except SafetensorError as e:
        raise LoraFormatError(f"{path} is not a readable safetensors file ({e})") from e
    bad = [k for k in state if not (k.startswith(PREFIX) and (".lora_A." in k or ".lora_B." in k))]
    if bad:
        raise LoraFormatError(f"{path}: key {bad[0]!r} is not in the expected layout "
                              f"'unet.<module>.lora_A.weight' / 'unet.<module>.lora_B.weight' (diffusers)")
    result = set_peft_model_state_dict(unet, {k[len(PREFIX):]: v for k, v in state.items()})
    if result.unexpected_keys:
        raise LoraFormatError(f"{path}: keys {result.unexpected_keys[:3]} match no LoRA module of this UNet")
