"""What kind of diffusers denoiser a module is, under whatever wraps it (peft injects in place; FSDP2 makes a
subclass `FSDP<Name>`; FSDP1 and DDP hold it as `.module`): the class to rebuild a plain copy from its config, the
key prefix of its LoRA files and the blocks FSDP shards, for a UNet or a transformer alike; and the one way any of
them is called (`denoiser_out`)."""
from __future__ import annotations

import torch
from torch import Tensor


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
    "diffusers.models.transformers.transformer_flux": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
}


def block_classes() -> set[type]:
    import importlib
    return {getattr(importlib.import_module(mod), n) for mod, names in BLOCK_CLASSES.items() for n in names}


# ---- the one call every stage, evaluator and solver makes ----
def denoiser_out(net, x: Tensor, time: Tensor, cond, tensors: dict[str, Tensor] | None = None) -> Tensor:
    """A diffusers denoiser's output at latents x [B, C, H, W] with time in the scheduler's scale (t for VP, 1000
    sigma for flow): UNet2DConditionModel and SD3's transformer take x first and `timestep` by name; FLUX's is called
    as its pipeline calls it (`flux_out`). cond is a tensor (encoder_hidden_states) or a dict of the network's keyword
    arguments (SDXL's added conditions, SD3's pooled prompt, FLUX's guidance). `tensors`: run with these in place of
    the module's own, by name (functional_call; names checked by their owner, hence strict=False)."""
    kwargs = {"timestep": time, **denoiser_kwargs(cond)}
    if denoiser_class(net).__name__ in PACKED:
        return flux_out(net, x, kwargs, tensors)
    return _call(net, x, kwargs, tensors)


def denoiser_kwargs(cond) -> dict:
    return cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}


PACKED = ("FluxTransformer2DModel",)  # transformers that read 2x2-packed latent tokens with position ids


def flux_out(net, x: Tensor, kwargs: dict, tensors: dict[str, Tensor] | None = None) -> Tensor:
    """FLUX's call, as FluxPipeline makes it: the latents packed 2x2 into tokens with their (0, row, col) ids, the
    text tokens with zero ids, the time as sigma = timestep / 1000 (the transformer multiplies it, and the guidance,
    by 1000 inside); the packed velocity it returns, unpacked to [B, C, H, W]."""
    from diffusers import FluxPipeline
    B, C, H, W = x.shape
    text = kwargs["encoder_hidden_states"]
    kwargs = {**kwargs, "timestep": kwargs["timestep"] / 1000,  # FluxPipeline: timestep=t / 1000
              "img_ids": FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype),
              "txt_ids": torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype)}
    out = _call(net, FluxPipeline._pack_latents(x, B, C, H, W), kwargs, tensors)
    return FluxPipeline._unpack_latents(out, H, W, 1)


def _call(net, x: Tensor, kwargs: dict, tensors: dict[str, Tensor] | None) -> Tensor:
    if tensors is None:
        return net(x, **kwargs).sample
    from torch.func import functional_call
    return functional_call(net, tensors, (x,), kwargs, strict=False).sample
