"""`hsd generate --preset`: the release's recipes beyond SD1.5/SDXL, by name (steps, guidance, LoRA scale), and
the error every generate argument raises."""
from __future__ import annotations

from pathlib import Path

from ..errors import HsdError


class GenerateError(HsdError, ValueError):
    """Arguments that cannot make images: no prompts, mismatched prompts and seeds, an unknown recipe."""


# The release's recipes beyond SD1.5/SDXL (Hyper-SD README): Hyper-SD3 CFG LoRAs, fused at 0.125.
PRESETS = {"hyper-sd3-4": dict(steps=[4], guidance=3.0, scale=0.125),
           "hyper-sd3-8": dict(steps=[8], guidance=5.0, scale=0.125),
           "hyper-sd3-16": dict(steps=[16], guidance=7.0, scale=0.125)}


def apply_preset(args) -> None:
    """Fill what the command line left open from --preset (steps, guidance, LoRA weights), else the defaults."""
    preset = PRESETS.get(args.preset, {})
    args.steps = args.steps or preset.get("steps")
    if not args.steps:
        raise GenerateError(f"give --steps N [N ...] or a --preset ({', '.join(PRESETS)})")
    args.guidance = preset.get("guidance", 0.0) if args.guidance is None else args.guidance
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

