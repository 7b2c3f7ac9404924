"""What kind of diffusers denoiser a module is, under whatever wraps it (peft injects in place; FSDP2 makes a
subclass `FSDP<Name>`; FSDP1 and DDP hold it as `.module`): the class to rebuild a plain copy from its config, the
key prefix of its LoRA files and the blocks FSDP shards, for a UNet or a transformer alike."""
from __future__ import annotations


def denoiser_class(net) -> type:
    """The diffusers model class of `net` (UNet2DConditionModel, SD3Transformer2DModel, ...)."""
    inner = net
    while inner is not None:
        for cls in type(inner).__mro__:
            if cls.__module__.startswith("diffusers.models."):
                return cls
        inner = getattr(inner, "module", None)  # FSDP1 and DDP wrap it as .module
    raise TypeError(f"{type(net).__name__} is not a diffusers model")


def lora_prefix(net) -> str:
    """The denoiser's key prefix in a diffusers-layout LoRA file: "unet." for UNets, "transformer." for the SD3 and
    FLUX transformers (what each pipeline's `load_lora_weights` reads)."""
    return "unet." if denoiser_class(net).__name__.startswith("UNet") else "transformer."


def denoiser_name(net) -> str:
    """What to call it in tables and messages: "UNet" or "transformer"."""
    return "UNet" if lora_prefix(net) == "unet." else "transformer"


def denoiser_blocks(net) -> list:
    """The units FSDP shards one by one (one all-gather each), the rest left to the root: a UNet's down, mid and up
    blocks; a transformer's joint blocks (SD3) and single-stream blocks (FLUX), in the order they run."""
    if hasattr(net, "transformer_blocks"):
        return [*net.transformer_blocks, *getattr(net, "single_transformer_blocks", [])]
    return [*net.down_blocks, *([net.mid_block] if net.mid_block is not None else []), *net.up_blocks]


# The block classes of `denoiser_blocks`, by name, for FSDP1's ModuleWrapPolicy (hsd.lit.strategies)
BLOCK_CLASSES = {
    "diffusers.models.unets.unet_2d_blocks": ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                                              "CrossAttnUpBlock2D", "UpBlock2D"),
    "diffusers.models.attention": ("JointTransformerBlock",),
}


def block_classes() -> set[type]:
    import importlib
    return {getattr(importlib.import_module(mod), n) for mod, names in BLOCK_CLASSES.items() for n in names}
