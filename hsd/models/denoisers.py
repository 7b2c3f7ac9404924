"""What kind of diffusers denoiser a module is, under whatever wraps it (peft injects in place; FSDP2 makes a
subclass `FSDP<Name>`): the class to rebuild a plain copy from its config, for a UNet or a transformer alike."""
from __future__ import annotations


def denoiser_class(net) -> type:
    """The diffusers model class of `net` (UNet2DConditionModel, SD3Transformer2DModel, ...)."""
    for cls in type(net).__mro__:
        if cls.__module__.startswith("diffusers.models."):
            return cls
    raise TypeError(f"{type(net).__name__} is not a diffusers model")


def lora_prefix(net) -> str:
    """The denoiser's key prefix in a diffusers-layout LoRA file: "unet." for UNets, "transformer." for the SD3 and
    FLUX transformers (what each pipeline's `load_lora_weights` reads)."""
    return "unet." if denoiser_class(net).__name__.startswith("UNet") else "transformer."
