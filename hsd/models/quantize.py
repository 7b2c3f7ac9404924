"""The frozen base under the LoRA, quantized weight-only: QLoRA's idea applied to a distillation LoRA (issue 23).

A LoRA recipe trains only the adapters; the base weights are read, never changed, and the teacher is the same base
with the adapters off. So the base can be held quantized while the LoRA trains in full precision on top: the
student and the teacher then share one quantized network, and the LoRA file, in the release layout, loads onto an
unquantized base as any other.

Library (chosen by measurement, torch 2.14.1, torchao 0.18.0, peft 0.21.2; docs/memory.md): **torchao** for every
mode. `int8` and `fp8` are its weight-only configs (`Int8WeightOnlyConfig`, `Float8WeightOnlyConfig`: one scale per
output row), `nf4` its NF4Tensor (QLoRA's 4-bit NormalFloat in blocks of 64 with double-quantized scales, the
format torchtune's QLoRA trains on). All three run on CPU and CUDA; peft wraps int8/fp8 layers as its
`TorchaoLoraLinear` and keeps its plain LoRA Linear for NF4 (`F.linear` dispatches on the NF4 weight); gradients
reach the LoRA through the quantized layers, and disabling the adapters gives back the quantized base exactly.
bitsandbytes' NF4 was the alternative: on CPU it needs a kernel fetched from a model hub at run time, so nothing
could test it here, and its Linear4bit would be a second code path for the same format.

Only nn.Linear weights are quantized, as diffusers' TorchAoConfig and bitsandbytes do: biases, norms, embeddings and
convolutions (a UNet's resnets) stay in model.frozen_dtype. An NF4 layer needs a weight count divisible by its block
of 64 values; a layer that is not stays unquantized and is counted as such.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MissingPackageError
from ..names import QUANTIZE_MODES as MODES

NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # torchao's (and QLoRA's) defaults: 64 values per scale, 256 scales per scaler


@dataclass(frozen=True)
class Quantized:
    """What `quantize_frozen` changed: layers and weights quantized, of the Linear weights, and their bytes."""
    mode: str
    layers: int
    linear_layers: int
    params: int              # weights quantized
    linear_params: int       # weights of every Linear layer
    bytes_before: int        # of the quantized weights, before
    bytes_after: int         # and after (values, scales and any other inner tensor)

    def line(self) -> str:
        if self.mode == "none":
            return "frozen base: not quantized"
        return (f"frozen base quantized to {self.mode} (torchao, weight-only): {self.layers} of {self.linear_layers} "
                f"Linear layers, {self.params / 1e6:.2f} M of {self.linear_params / 1e6:.2f} M Linear weights, "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB")


def _torchao():
    try:
        import torchao.quantization as q
    except ImportError as e:
        raise MissingPackageError("model.quantize needs torchao: pip install 'torchao==0.18.0' (hsd's setup.sh "
                                  "installs it)") from e
    return q


def is_quantized(t: Tensor) -> bool:
    """A torchao quantized tensor (int8 / fp8 / NF4: NF4Tensor has a base class of its own)."""
    try:
        from torchao.quantization import NF4Tensor
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return isinstance(t, (TorchAOBaseTensor, NF4Tensor))


def dense(t: Tensor) -> Tensor:
    """A plain tensor holding a quantized tensor's dequantized values (a plain tensor as it is), in its dtype."""
    if not is_quantized(t):
        return t
    from torchao.quantization import NF4Tensor
    return t.get_original_weight() if isinstance(t, NF4Tensor) else t.dequantize()


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor holds: a quantized one's inner tensors (values and scales) summed."""
    if is_quantized(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), Tensor))
    return t.numel() * t.element_size()


def nf4_fits(weight: Tensor) -> bool:
    return weight.numel() % NF4_BLOCK == 0


def quantized_bytes(shape: tuple[int, ...], element_size: int, mode: str) -> int:
    """Bytes a Linear weight of `shape` (its dtype `element_size` bytes a value) holds under `mode`, as torchao
    0.18 stores it (tested against `tensor_bytes` of the real tensors): int8 a byte per value, a float32 scale and
    an int8 zero point per row; fp8 a byte per value and a float32 scale per row; NF4 half a byte per value, an int8
    scale per block of 64, a scale of those per group of up to 256 blocks, their mean and the 16-value table (in the
    weight's dtype). `none`, or an NF4 weight that does not fill whole blocks: unchanged. No torch work: the memory
    model calls it on meta tensors."""
    numel, rows = math.prod(shape), shape[0]
    if mode == "int8":
        return numel + 5 * rows
    if mode == "fp8":
        return numel + 4 * rows
    if mode == "nf4" and numel % NF4_BLOCK == 0:
        blocks = numel // NF4_BLOCK
        return numel // 2 + blocks + (blocks // math.gcd(blocks, NF4_SCALER_BLOCK) + 17) * element_size
    return numel * element_size


def _to_nf4(w: Tensor) -> Tensor:
    q = _torchao()
    scales = w.numel() // NF4_BLOCK  # the scales are quantized in groups that must divide their count
    return q.to_nf4(w, NF4_BLOCK, math.gcd(scales, NF4_SCALER_BLOCK))


def quantize_frozen(net: nn.Module, mode: str) -> Quantized:
    """Quantize every nn.Linear weight of the frozen `net` in place (before any LoRA is attached: peft picks its
    layer type from the base weight it finds). `mode`: none | int8 | fp8 | nf4."""
    if mode not in MODES:
        raise ValueError(f"quantize mode must be one of {', '.join(MODES)}, got {mode!r}")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    chosen = [m for m in linears if mode == "nf4" and nf4_fits(m.weight) or mode in ("int8", "fp8")]
    before = sum(tensor_bytes(m.weight) for m in chosen)
    if chosen:
        q = _torchao()
        if mode == "nf4":
            for m in chosen:
                m.weight = nn.Parameter(_to_nf4(m.weight.detach()), requires_grad=False)
        else:
            config = q.Int8WeightOnlyConfig() if mode == "int8" else q.Float8WeightOnlyConfig()
            picked = {id(m) for m in chosen}
            q.quantize_(net, config, filter_fn=lambda m, _: id(m) in picked)
    net.requires_grad_(False)
    return Quantized(mode, len(chosen), len(linears), sum(m.weight.numel() for m in chosen),
                     sum(m.weight.numel() for m in linears), before, sum(tensor_bytes(m.weight) for m in chosen))
