"""peft LoRA on a diffusers UNet: attach, save/load (diffusers or kohya layout), start from a released LoRA, fuse.

Which adapters run and train is set only through hsd.models.adapters."""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from .denoisers import denoiser_class, lora_prefix
from .lora_formats import PREFIX, LoraFile, LoraFormatError, LoraModule, peft_config_kwargs, read_lora, write_lora
from .quantize import dense
from .targets import DEFAULT_TARGETS

__all__ = ["DEFAULT_TARGETS", "PREFIX", "LoraFormatError", "attach_lora", "add_adapter", "lora_params", "save_lora",
           "load_lora", "load_lora_adapter", "unet_lora", "fuse_loras", "plain_unet"]


def attach_lora(unet, rank: int, alpha: float, targets: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Freeze the UNet, add a peft LoRA (B = 0, so the student starts as the teacher); return LoRA params."""
    unet.requires_grad_(False)
    return add_adapter(unet, "default", rank, alpha, targets)


def add_adapter(unet, name: str, rank: int, alpha: float, targets: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A second (third...) zero-initialised adapter beside the existing ones; returns its parameters."""
    with quiet_peft():
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or DEFAULT_TARGETS,
                                    init_lora_weights=True), adapter_name=name)
    return lora_params(unet, name)


@contextmanager
def quiet_peft():
    """peft's two warnings that do not apply here: a model with an adapter getting another (that is the point), and
    a LoRA on a torchao-quantized layer that cannot merge into it (hsd never merges into the frozen base: fused
    copies are dense, hsd.models.quantize.dense)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        yield


def lora_params(unet, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """LoRA parameters by plain module path; with `adapter`, only that adapter's."""
    return {_plain(n): p for n, p in unet.named_parameters()
            if "lora_" in n and (adapter is None or f".{adapter}." in n)}


def plain_unet(unet, fuse: dict[str, float] | None = None):
    """A copy of the base UNet without peft layers, with the named adapters fused at weights {adapter: w}."""
    base = {k.replace(".base_layer", ""): dense(v.detach()).clone() for k, v in unet.state_dict().items()
            if "lora_" not in k}  # a quantized base (model.quantize) comes back dequantized, in its dtype
    with torch.device("meta"):  # no random initialisation to overwrite (a minute per SDXL copy on one CPU thread)
        plain = denoiser_class(unet).from_config(unet.config)
    plain.load_state_dict(base, assign=True)  # copies, in the base weights' dtype
    for adapter, w in (fuse or {}).items():
        modules, where = unet_lora(unet, adapter), f"adapter {adapter!r}"
        _fuse(_base_layers(plain, modules, where), modules, w, where)
    return plain.requires_grad_(False)


def _plain(name: str) -> str:
    """The module path without FSDP's wrapper segments, so names are the same sharded or not."""
    return name.replace("_fsdp_wrapped_module.", "")


def unet_lora(unet, adapter: str = "default") -> dict[str, LoraModule]:
    """The adapter's factors and configured alpha per module (set_adapters weights are not part of a LoRA)."""
    return {name: LoraModule(layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach(),
                             float(layer.lora_alpha[adapter]))
            for name, layer in _lora_layers(unet, adapter).items()}


def save_lora(path: str | os.PathLike, unet, metadata: dict[str, str] | None = None, fmt: str = "diffusers",
              adapter: str = "default") -> Path:
    """Write the adapter as safetensors in the diffusers ("unet.<module>.lora_A.weight", "transformer.<module>..." for a
    transformer) or kohya layout."""
    return write_lora(path, unet_lora(unet, adapter), fmt, metadata, lora_prefix(unet))


def load_lora(unet, path: str | os.PathLike, adapter: str = "default") -> None:
    """Load a LoRA file of either layout into the UNet's attached adapter of the same rank."""
    _load_into(unet, read_lora(path, unet.config), adapter)


def load_lora_adapter(unet, path: str | os.PathLike, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Add a new trainable adapter shaped like the file (ranks, alphas, target modules) holding its weights, e.g. to
    train on from a released Hyper-SD LoRA. The base UNet is frozen; returns the adapter's LoRA parameters."""
    lora = read_lora(path, unet.config)
    _base_layers(unet, lora.modules, lora.path)  # fail on unknown modules before touching the UNet
    unet.requires_grad_(False)
    with quiet_peft():
        unet.add_adapter(LoraConfig(**peft_config_kwargs(lora.modules)), adapter_name=adapter_name)
    _load_into(unet, lora, adapter_name)
    params = lora_params(unet, adapter_name)
    for p in params.values():
        p.requires_grad_(True)
    return params


def fuse_loras(unet, paths: list[str | os.PathLike], weights: list[float]) -> None:
    """Add sum_i w_i * scale_i * B_i A_i into the base weights, so the plain UNet can be save_pretrained."""
    if len(paths) != len(weights):
        raise LoraFormatError(f"{len(paths)} LoRA files but {len(weights)} weights")
    loras = [read_lora(p, unet.config) for p in paths]
    targets = [_base_layers(unet, lora.modules, lora.path) for lora in loras]  # all checked before any change
    for lora, layers, w in zip(loras, targets, weights):
        _fuse(layers, lora.modules, w, lora.path)


def _fuse(layers: dict[str, torch.nn.Module], modules: dict[str, LoraModule], weight: float, where) -> None:
    """Add weight * scale * B A of each module into its base layer (`layers` from `_base_layers`)."""
    with torch.no_grad():
        for name, m in modules.items():
            w = layers[name].weight
            w += _fit(where, name, m.delta().to(w.device) * weight, w).to(w.dtype)


def _lora_layers(unet, adapter: str) -> dict[str, LoraLayer]:
    return {_plain(n): m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def prefix_mismatch(lora: LoraFile, net) -> str | None:
    """Why a LoRA file cannot go onto this denoiser by its key prefix (a UNet LoRA on a transformer, or the other way
    round), or None when the prefixes agree."""
    if lora.prefix == lora_prefix(net):
        return None
    return (f"{lora.path} is a LoRA of a {lora.prefix.rstrip('.')}, but this model's denoiser is a "
            f"{lora_prefix(net).rstrip('.')}")


def _load_into(unet, lora: LoraFile, adapter: str) -> None:
    if (why := prefix_mismatch(lora, unet)) is not None:
        raise LoraFormatError(f"{why}: it was trained for another architecture")
    layers = _lora_layers(unet, adapter)
    if not layers:
        raise LoraFormatError(f"the UNet has no LoRA adapter {adapter!r} to load {lora.path} into")
    _require_known(lora.modules, lora.path, set(layers), f"LoRA layer of adapter {adapter!r}")
    updates = []  # all checked before any is written, so a bad file leaves the adapter as it was
    for name, layer in layers.items():
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        m = lora.modules.get(name)
        if m is None:  # a module the file leaves out must not keep stale weights
            updates.append((b, torch.zeros_like(b)))
            continue
        if m.rank != layer.r[adapter]:
            raise LoraFormatError(f"{lora.path} has rank {m.rank} (module {name}) but the UNet's adapter "
                                  f"{adapter!r} has rank {layer.r[adapter]}")
        # fold the file's scale into B so the adapter, at its own alpha, applies exactly the file's delta
        ratio = m.scale / (layer.lora_alpha[adapter] / layer.r[adapter])
        updates += [(a, _fit(lora.path, name, m.down, a)), (b, _fit(lora.path, name, m.up * ratio, b))]
    with torch.no_grad():
        for param, value in updates:
            param.copy_(value)


def _base_layers(unet, lora: dict[str, LoraModule], where) -> dict[str, torch.nn.Module]:
    """The plain Linear/Conv2d each LoRA module targets (under any peft wrapper); `where` names the LoRA."""
    modules = dict(unet.named_modules())
    layers = {n: modules[n].get_base_layer() if isinstance(modules.get(n), LoraLayer) else modules.get(n)
              for n in lora}
    plain = {n for n, m in layers.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    _require_known(lora, where, plain, "Linear/Conv2d module")
    return layers


def _require_known(lora: dict[str, LoraModule], where, known: set[str], what: str) -> None:
    unknown = [n for n in lora if n not in known]
    if unknown:
        raise LoraFormatError(f"{where}: {len(unknown)} of its {len(lora)} modules match no {what} of "
                              f"this UNet, e.g. {', '.join(unknown[:3])}")


def _fit(path: Path, name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` in the shape of `like` (a 1x1 conv may come as a matrix); a size mismatch is a different model."""
    if value.numel() != like.numel():
        raise LoraFormatError(f"{path}: module {name} has shape {tuple(value.shape)} but this UNet needs "
                              f"{tuple(like.shape)}; the LoRA is for a different model")
    return value.reshape(like.shape)
