"""The release's recipes: `hsd generate --preset` beyond SD1.5/SDXL, by name (steps, guidance, LoRA scale) and model
family, the VP recipes' schedulers (DDIM trailing, TCD, LCM), and the error every generate argument raises."""
from __future__ import annotations

from pathlib import Path

from ..errors import HsdError


class GenerateError(HsdError, ValueError):
    """Arguments that cannot make images: no prompts, mismatched prompts and seeds, an unknown recipe."""


# The release's recipes beyond SD1.5/SDXL (Hyper-SD README), each for its model family: Hyper-SD3 CFG LoRAs
# (guidance = CFG) and Hyper-FLUX.1-dev LoRAs (guidance = the value FLUX's guidance embedding takes), fused at 0.125.
PRESETS = {"hyper-sd3-4": dict(family="sd3", steps=[4], guidance=3.0, scale=0.125),
           "hyper-sd3-8": dict(family="sd3", steps=[8], guidance=5.0, scale=0.125),
           "hyper-sd3-16": dict(family="sd3", steps=[16], guidance=7.0, scale=0.125),
           "hyper-flux-8": dict(family="flux", steps=[8], guidance=3.5, scale=0.125),
           "hyper-flux-16": dict(family="flux", steps=[16], guidance=3.5, scale=0.125)}
# --guidance when neither it nor a preset gives one: no CFG (the few-step recipes); FLUX.1-dev, guidance-distilled,
# at its pipeline's default embedded guidance
DEFAULT_GUIDANCE = {"flux": 3.5}
NAMES = {"sd": "SD1.5 / SDXL", "sd3": "SD3", "flux": "FLUX.1"}  # model_family's answers


def default_guidance(family: str) -> float:
    """The guidance a family samples at when nothing names one (hsd generate, hsd eval, the training samples)."""
    return DEFAULT_GUIDANCE.get(family, 0.0)


def apply_preset(args, family: str) -> None:
    """Fill what the command line left open from --preset (steps, guidance, LoRA weights), else the defaults;
    `family`: the model's (sd15, sdxl, sd3, flux), which the preset must be for."""
    preset = PRESETS.get(args.preset, {})
    if preset and preset["family"] != family:
        fits = [n for n, p in PRESETS.items() if p["family"] == family]
        raise GenerateError(f"--preset {args.preset} is a recipe for {NAMES[preset['family']]} models; {args.model} "
                            f"holds {NAMES[family]} (its presets: {', '.join(fits) or 'none'})")
    args.steps = args.steps or preset.get("steps")
    if not args.steps:
        raise GenerateError(f"give --steps N [N ...] or a --preset ({', '.join(PRESETS)})")
    if args.guidance is None:
        args.guidance = preset.get("guidance", default_guidance(family))
    args.lora = [(path, preset_weight(path, preset) if w is None else w) for path, w in args.lora]


def preset_weight(path: str | Path, preset: dict) -> float:
    """The preset's LoRA scale for a file that stores no alpha (the release's: trained at alpha / rank = 0.125, so
    fused at 0.125); 1 for a file that stores its own (hsd's: diffusers applies its alpha / rank already)."""
    from safetensors import SafetensorError, safe_open

    from ..models.lora_formats import ADAPTER_METADATA
    try:
        with safe_open(str(path), "pt") as f:
            stores = ADAPTER_METADATA in (f.metadata() or {}) or any(k.endswith(".alpha") for k in f.keys())
    except (OSError, SafetensorError):
        stores = False  # an unreadable file is named by the loader
    return 1.0 if stores else preset.get("scale", 1.0)


def model_family(model: Path) -> str:
    """"sd3" or "flux" for a transformer folder (what its model_index.json holds), "sd" for a UNet model (SD1.5,
    SDXL; told apart when it loads)."""
    from ..models.dit import dit_family, is_dit_folder
    return dit_family(model) if is_dit_folder(model) else "sd"


def _lcm_start_is_intended(record) -> bool:
    """The one-step UNet's recipe starts at t = 800 on purpose; LCM warns about any start but T - 1."""
    return "first timestep on the custom timestep schedule" not in record.getMessage()


def recipe_scheduler(name: str, config):
    """The release recipe's scheduler ("ddim" trailing, "tcd", "lcm") built from a model's scheduler config."""
    import logging

    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler
    logging.getLogger("diffusers.schedulers.scheduling_lcm").addFilter(_lcm_start_is_intended)  # once: same object
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing")
    return {"tcd": TCDScheduler, "lcm": LCMScheduler}[name].from_config(config)
