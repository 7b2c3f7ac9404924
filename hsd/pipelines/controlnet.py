"""ControlNet support for `hsd generate` (--controlnet): the ControlNet folder loaded and checked against the model's
UNet, and diffusers' ControlNet pipeline built over the text-to-image pipeline's own modules, LoRAs already fused.
torch and diffusers are imported inside the functions, as in generate.py: `hsd --help` should not pay for them.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX"}
CONTROLNET_FOLDER = "a diffusers ControlNetModel folder with config.json and diffusion_pytorch_model.safetensors"
IMAGE_FILE = "an image file PIL can read: PNG, JPEG, WebP..."
# The UNet settings a ControlNet must share: its residuals are added to the UNet's, block by block, and it reads
# the same text conditioning (SDXL: also the pooled text + size embeddings, addition_embed_type "text_time").
CONTROLNET_MATCHES = ("cross_attention_dim", "addition_embed_type", "block_out_channels", "layers_per_block")


def controlnet_pipeline(pipe, controlnet):
    """diffusers' ControlNet pipeline over a text-to-image pipeline's own modules (none reloaded or copied).
    Built directly rather than with `from_pipe`, which casts every module and so logs diffusers' spurious
    "keep in float32" warning."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
    cls = StableDiffusionXLControlNetPipeline if hasattr(pipe, "text_encoder_2") else StableDiffusionControlNetPipeline
    takes = inspect.signature(cls.__init__).parameters
    parts = {k: v for k, v in pipe.components.items() if k in takes}
    if "requires_safety_checker" in takes:
        parts["requires_safety_checker"] = False     # as the text-to-image pipeline: no safety checker is loaded
    return cls(**parts, controlnet=controlnet)


def load_controlnet(path: Path, pipe, family: str):
    """A diffusers ControlNetModel folder, refused before its weights load if it was made for another UNet."""
    from diffusers import ControlNetModel

    from ..models.components import ModelError
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "not found" if not path.exists() else "is not a folder" if path.is_file() else "has no config.json"
        raise ModelError(f"ControlNet {path} {what}: expected {CONTROLNET_FOLDER}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"ControlNet {path}: config.json is not JSON ({e}); expected {CONTROLNET_FOLDER}") from e
    if "ControlNet" not in str(config.get("_class_name", "ControlNet")):
        raise ModelError(f"ControlNet {path} holds a {config['_class_name']}, not a ControlNetModel: "
                         f"expected {CONTROLNET_FOLDER}")
    _check_controlnet_fits(config, pipe, path, family)
    try:
        return ControlNetModel.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError) as e:   # missing or truncated weights, shapes that do not fit
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"diffusers cannot load the ControlNet {path} ({type(e).__name__}: {first}); "
                         f"expected {CONTROLNET_FOLDER}") from e


def _check_controlnet_fits(config: dict, pipe, path: Path, family: str) -> None:
    """Refuse a ControlNet made for another UNet (e.g. an SD1.5 ControlNet on an SDXL model), which would
    otherwise fail mid-generation on a tensor shape."""
    from ..models.components import ModelError, family_of
    ours = pipe.unet.config
    differ = [k for k in CONTROLNET_MATCHES if _plain(config.get(k)) != _plain(ours.get(k))]
    if differ:
        theirs = ", ".join(f"{k}={_plain(config.get(k))}" for k in differ)
        needs = ", ".join(f"{k}={_plain(ours.get(k))}" for k in differ)
        kind = family_of(config)
        what = (f"an {FAMILY_NAMES[kind]} ControlNet" if kind != family
                else f"a ControlNet for another {FAMILY_NAMES[family]} architecture")
        raise ModelError(f"ControlNet {path} is {what} ({theirs}) but this {FAMILY_NAMES[family]} model's UNet "
                         f"has {needs}: expected a ControlNet trained for this model")
    # Each stride-2 conv of its image encoder halves the control image; it must land on the latent size.
    channels = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    if 2 ** (len(channels) - 1) != pipe.vae_scale_factor:
        raise ModelError(f"ControlNet {path} downsamples its control image by {2 ** (len(channels) - 1)} but this "
                         f"model's VAE by {pipe.vae_scale_factor}: expected a ControlNet trained for this model")


def _plain(value):
    """Config values compared as JSON reads them: tuples as lists."""
    return list(value) if isinstance(value, (list, tuple)) else value
