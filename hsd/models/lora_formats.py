"""LoRA safetensors files in the two layouts people exchange, and exact merging of them.

A LoRA is held as {diffusers module path: LoraModule}. The layouts differ in key names and in where alpha lives:
- diffusers/peft: "unet.<module>.lora_A.weight" / ".lora_B.weight" ("transformer.<module>..." for SD3 and FLUX, the
  layout diffusers' SD3/FLUX `load_lora_weights` reads); alpha in the peft LoraConfig that diffusers keeps as JSON under
  the "lora_adapter_metadata" metadata key, else alpha = rank (diffusers' convention);
- kohya (sd-scripts, ComfyUI, A1111): "lora_unet_<module with '.' -> '_'>.lora_down.weight" / ".lora_up.weight" and a
  0-dim ".alpha" (scale = alpha / rank; no alpha means alpha = rank). The released Hyper-SD SD1.5/SDXL LoRAs use it.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from ..errors import HsdError
from ..io import atomic_path, check_input, read_safetensors

FORMATS = ("diffusers", "kohya")
PREFIX = "unet."
PREFIXES = (PREFIX, "transformer.")  # the denoiser's name in a pipeline: UNet (SD1.5, SDXL) or transformer (SD3, FLUX)
KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_KEYS = (".lora_A.weight", ".lora_B.weight")
KOHYA_KEYS = (".lora_down.weight", ".lora_up.weight", ".alpha")
LAYOUTS = ('expected layouts: diffusers "unet.<module>.lora_A.weight" / "unet.<module>.lora_B.weight", or kohya '
           '"lora_unet_<module>.lora_down.weight" / "lora_unet_<module>.lora_up.weight" / "lora_unet_<module>.alpha"')
ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' metadata key for the peft LoraConfig of a saved LoRA
MANAGED_METADATA = ("format", ADAPTER_METADATA)  # rewritten on every save, never copied from a source file
# kohya's SGM/LDM block numbers ("input_blocks_4_1") decode with the resnets per block: 2 in both SD1.5 and SDXL.
SD_UNET_CONFIG = SimpleNamespace(layers_per_block=2)


class LoraFormatError(HsdError, ValueError):
    pass


@dataclass(frozen=True)
class LoraModule:
    down: torch.Tensor  # A: (rank, in) or, for convs, (rank, in, kh, kw)
    up: torch.Tensor  # B: (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """scale * B A as the weight shape: a kxk conv followed by a 1x1 conv is one kxk conv."""
        d = self.up.flatten(1).float() @ self.down.flatten(1).float() * self.scale
        return d.reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class LoraFile:
    path: Path
    format: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    prefix: str = PREFIX  # whose modules: "unet." or "transformer." (kohya files are UNet files)


def read_lora(path: str | os.PathLike, unet_config=None) -> LoraFile:
    """Read either layout (detected from the keys); `unet_config` decodes SGM-style kohya block numbers."""
    path = Path(path)
    state, metadata = _read_safetensors(path)
    fmt = _detect_format(path, state)
    if fmt == "kohya":
        return LoraFile(path, fmt, _from_kohya(path, state, unet_config), metadata)
    prefix = next(p for p in PREFIXES if next(iter(state)).startswith(p))
    if any(not k.startswith(prefix) for k in state):
        raise LoraFormatError(f"{path}: mixes the modules of a UNet and of a transformer; {LAYOUTS}")
    return LoraFile(path, fmt, _from_diffusers(path, state, metadata, prefix), metadata, prefix)


def write_lora(path: str | os.PathLike, modules: dict[str, LoraModule], fmt: str = "diffusers",
               metadata: dict[str, str] | None = None, prefix: str = PREFIX) -> Path:
    """Write atomically (temp file renamed into place), with a "format" metadata entry naming the layout. `prefix`:
    the denoiser's name in the diffusers layout (kohya files exist for UNets only)."""
    if fmt not in FORMATS:
        raise LoraFormatError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "kohya" and prefix != PREFIX:
        raise LoraFormatError(f"the kohya layout holds UNet LoRAs only; write {prefix.rstrip('.')} LoRAs as diffusers")
    state, extra = _to_kohya(modules) if fmt == "kohya" else _to_diffusers(modules, prefix)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={**(metadata or {}), **extra, "format": f"{fmt}-lora"})
    return Path(path)


def merge_loras(paths: list[str | os.PathLike], weights: list[float], out: str | os.PathLike,
                fmt: str = "kohya") -> Path:
    """One LoRA file equal to applying each input at its weight (any layouts, ranks and alphas)."""
    if len(paths) != len(weights):
        raise LoraFormatError(f"{len(paths)} LoRA files but {len(weights)} weights")
    files = [read_lora(p) for p in paths]
    prefixes = {f.prefix for f in files}
    if len(prefixes) > 1:
        raise LoraFormatError(f"{', '.join(paths)}: LoRAs of a UNet and of a transformer cannot be merged")
    sources = json.dumps([[str(f.path), w] for f, w in zip(files, weights)])
    return write_lora(out, merge([(f.modules, w) for f, w in zip(files, weights)]), fmt, {"hsd_merged_from": sources},
                      prefixes.pop())


def convert_lora(src: str | os.PathLike, out: str | os.PathLike, fmt: str) -> Path:
    f = read_lora(src)
    return write_lora(out, f.modules, fmt, {k: v for k, v in f.metadata.items() if k not in MANAGED_METADATA},
                      f.prefix)


def lora_summary(path: str | os.PathLike) -> dict:
    f = read_lora(path)
    return {"file": str(f.path), "format": f.format, "denoiser": f.prefix.rstrip("."), "modules": len(f.modules),
            "ranks": sorted({m.rank for m in f.modules.values()}),
            "alphas": sorted({m.alpha for m in f.modules.values()}), "metadata": f.metadata}


def peft_config_kwargs(modules: dict[str, LoraModule]) -> dict:
    """LoraConfig arguments reproducing every module's rank and alpha (the common ones plus per-module patterns)."""
    r = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": list(modules),
            "rank_pattern": {n: m.rank for n, m in modules.items() if m.rank != r},
            "alpha_pattern": {n: m.alpha for n, m in modules.items() if m.alpha != alpha}}


def merge(parts: list[tuple[dict[str, LoraModule], float]]) -> dict[str, LoraModule]:
    """Exactly sum_i w_i (alpha_i / r_i) B_i A_i per module: factors stacked along the rank axis, w_i s_i folded into
    A_i, so the merged module has scale 1. Modules missing from some LoRAs simply have fewer blocks."""
    names = list(dict.fromkeys(n for modules, _ in parts for n in modules))
    merged = {}
    for name in names:
        pieces = [(modules[name], w) for modules, w in parts if name in modules]
        shapes = {(m.up.shape[0], *m.down.shape[1:]) for m, _ in pieces}
        if len(shapes) > 1:
            raise LoraFormatError(f"cannot merge {name}: the LoRAs give it different weight shapes {sorted(shapes)}")
        down = torch.cat([m.down.float() * (w * m.scale) for m, w in pieces])
        up = torch.cat([m.up.float() for m, _ in pieces], dim=1)
        merged[name] = LoraModule(down, up, float(down.shape[0]))
    rank = max(m.rank for m in merged.values())
    return {n: _pad_rank(m, rank) for n, m in merged.items()}


def _pad_rank(m: LoraModule, rank: int) -> LoraModule:
    """Zero components change nothing, and one rank and alpha for all modules keeps the file right in readers that
    assume a single alpha (diffusers mis-keys kohya per-module alphas of attention layers)."""
    extra = rank - m.rank
    down = torch.cat([m.down, m.down.new_zeros(extra, *m.down.shape[1:])])
    up = torch.cat([m.up, m.up.new_zeros(m.up.shape[0], extra, *m.up.shape[2:])], dim=1)
    return LoraModule(down, up, float(rank))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_input(path, "LoRA file", "a .safetensors LoRA file in the diffusers or kohya layout")
    return read_safetensors(path, LoraFormatError)


def _layout(key: str) -> str | None:
    if key.startswith(PREFIXES) and key.endswith(DIFFUSERS_KEYS):
        return "diffusers"
    if key.startswith(KOHYA_PREFIX) and key.endswith(KOHYA_KEYS):
        return "kohya"
    return None


def _detect_format(path: Path, state: dict[str, torch.Tensor]) -> str:
    bad = next((k for k in state if _layout(k) is None), None)
    if bad is not None:
        raise LoraFormatError(f"{path}: key {bad!r} is not in a known LoRA layout; {LAYOUTS}")
    layouts = {_layout(k) for k in state}
    if len(layouts) != 1:
        raise LoraFormatError(f"{path}: " + ("holds no tensors" if not layouts else "mixes both layouts")
                              + f"; {LAYOUTS}")
    return layouts.pop()


def _group(path: Path, state: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """{module key: {suffix: tensor}}, checking each module has both factors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        suffix = next(s for s in suffixes if key.endswith(s))
        groups.setdefault(key[:-len(suffix)], {})[suffix] = value
    for base, tensors in groups.items():
        missing = [s for s in suffixes[:2] if s not in tensors]
        if missing:
            raise LoraFormatError(f"{path}: {base!r} has no {base + missing[0]!r} tensor; {LAYOUTS}")
    return groups


def _from_diffusers(path: Path, state, metadata: dict[str, str], prefix: str = PREFIX) -> dict[str, LoraModule]:
    try:
        stored = json.loads(metadata.get(ADAPTER_METADATA) or "{}")
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"{path}: unreadable {ADAPTER_METADATA!r} metadata ({e})") from e
    config = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
    patterns = config.get("alpha_pattern") or {}

    def alpha(name: str, rank: int) -> float:
        return float(patterns.get(get_pattern_key(list(patterns), name), config.get("lora_alpha", rank)))

    return {base[len(prefix):]: LoraModule(t[".lora_A.weight"], t[".lora_B.weight"],
                                            alpha(base[len(prefix):], t[".lora_A.weight"].shape[0]))
            for base, t in _group(path, state, DIFFUSERS_KEYS).items()}


def _from_kohya(path: Path, state, unet_config) -> dict[str, LoraModule]:
    groups = _group(path, state, KOHYA_KEYS)
    names = _kohya_module_paths(path, list(groups), unet_config)
    return {names[base]: LoraModule(t[".lora_down.weight"], t[".lora_up.weight"],
                                    float(t[".alpha"]) if ".alpha" in t else float(t[".lora_down.weight"].shape[0]))
            for base, t in groups.items()}


def _kohya_module_paths(path: Path, bases: list[str], unet_config) -> dict[str, str]:
    """kohya module key -> diffusers module path, by diffusers' own kohya converter (which also decodes the SGM/LDM
    block names sd-scripts writes for SDXL). Module i goes in as the one-element tensor [i], so every renamed key
    leads back to its kohya key."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # heavy import, only needed for kohya files
    from diffusers.utils import convert_unet_state_dict_to_peft

    tags = {f"{b}{s}": torch.tensor([i]) for i, b in enumerate(bases) for s in KOHYA_KEYS[:2]}
    try:
        converted, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(tags, unet_config=unet_config or SD_UNET_CONFIG)
    except (ValueError, IndexError, KeyError) as e:
        raise LoraFormatError(f"{path}: diffusers cannot decode its kohya module names ({e}); {LAYOUTS}") from e
    peft = convert_unet_state_dict_to_peft({k.removeprefix(PREFIX): v for k, v in converted.items()})
    paths = {bases[int(v)]: k.removesuffix(".lora_A.weight") for k, v in peft.items() if k.endswith(".lora_A.weight")}
    dropped = [b for b in bases if b not in paths]  # diffusers drops SGM names mixed with diffusers-style ones
    if dropped:
        raise LoraFormatError(f"{path}: diffusers cannot decode kohya modules {dropped[:3]}; {LAYOUTS}")
    return paths


def _to_kohya(modules: dict[str, LoraModule]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state = {}
    for name, m in modules.items():
        base = KOHYA_PREFIX + name.replace(".", "_")
        state |= {f"{base}.lora_down.weight": m.down, f"{base}.lora_up.weight": m.up,
                  f"{base}.alpha": torch.tensor(float(m.alpha))}
    return state, {}


def _to_diffusers(modules: dict[str, LoraModule],
                  prefix: str = PREFIX) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state = {}
    for name, m in modules.items():
        state |= {f"{prefix}{name}.lora_A.weight": m.down, f"{prefix}{name}.lora_B.weight": m.up}
    # diffusers' loaders build the adapter's LoraConfig from this, so they apply the same alphas we do
    config = {prefix + k: v for k, v in peft_config_kwargs(modules).items()}
    return state, {ADAPTER_METADATA: json.dumps(config, sort_keys=True)}
