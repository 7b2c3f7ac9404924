"""A LoRA training step on a frozen base held three ways (model.quantize: none, int8, nf4), side by side in one run.

The same FLUX-shaped transformer (FluxTransformer2DModel, random weights, `--width` wide, one double and one single
block unless told otherwise), the same rank-16 LoRA on the recipe's targets, the same batch: each repeat times one
step of each arm in turn (forward with the LoRA, backward to it, AdamW), so the machine's noise falls on all three
alike; the median per arm and its ratio to the unquantized base are printed. Also the frozen Linear bytes per arm.

    .venv/bin/python benchmarks/quantize_step.py                        # CPU: width 512, batch 2, 256 tokens
    .venv/bin/python benchmarks/quantize_step.py --device cuda --width 3072 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel

import hsd  # noqa: F401  (quiets torchao's import notices)
from hsd.models.adapters import TSCD, Adapters
from hsd.models.quantize import quantize_frozen

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out"]


def build(width: int, layers: int, dtype, device, mode: str):
    torch.manual_seed(0)
    heads = width // 64
    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=layers,
                                 attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=width,
                                 pooled_projection_dim=width, guidance_embeds=True, axes_dims_rope=(8, 28, 28))
    net = net.to(device, dtype).eval()
    held = quantize_frozen(net, mode)
    adapters = Adapters(net)
    params = list(adapters.attach(TSCD, 16, 16.0, TARGETS).values())
    return net, params, held


def inputs(width: int, tokens: int, batch: int, dtype, device):
    g = torch.Generator().manual_seed(1)
    side = int(tokens ** 0.5)
    axis = torch.arange(side, dtype=torch.float32)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1)
    return dict(hidden_states=torch.randn(batch, side * side, 64, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(batch, 32, width, generator=g).to(device, dtype),
                pooled_projections=torch.randn(batch, width, generator=g).to(device, dtype),
                timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
                img_ids=ids.reshape(-1, 3).to(device, dtype), txt_ids=torch.zeros(32, 3, device=device, dtype=dtype))


def step(net, params, opt, kw, device) -> float:
    start = time.perf_counter()
    out = net(**kw, return_dict=False)[0]
    out.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=1, help="double blocks and single blocks (each)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["none", "int8", "nf4"])
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    arms = {}
    for mode in a.modes:
        net, params, held = build(a.width, a.layers, dtype, a.device, mode)
        arms[mode] = (net, params, torch.optim.AdamW(params, lr=1e-4), held)
    kw = inputs(a.width, a.tokens, a.batch, dtype, a.device)
    times = {m: [] for m in arms}
    for r in range(a.warmup + a.repeats):
        for mode, (net, params, opt, _) in arms.items():
            t = step(net, params, opt, kw, a.device)
            if r >= a.warmup:
                times[mode].append(t)
    base = statistics.median(times[a.modes[0]])
    print(f"LoRA step, FLUX-shaped transformer width {a.width}, {a.layers}+{a.layers} blocks, batch {a.batch} x "
          f"{a.tokens} tokens, {a.dtype}, {a.device}, {torch.get_num_threads()} threads, median of {a.repeats}")
    print("| model.quantize | frozen Linear MiB | step ms (median) | ratio to baseline |")
    print("|---|---:|---:|---:|")
    for mode, (_, _, _, held) in arms.items():
        mib = (held.bytes_after if held.layers else sum(
            m.weight.numel() * m.weight.element_size() for n, m in arms[mode][0].named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in n)) / 2 ** 20
        med = statistics.median(times[mode])
        print(f"| {mode} | {mib:.1f} | {1000 * med:.1f} | ratio to baseline {med / base:.2f} |")


if __name__ == "__main__":
    main()
