"""TSCD training throughput and peak memory per micro-batch size, with and without gradient checkpointing,
plus k-step generation latency of `hsd generate`'s path vs. the stock diffusers pipeline (same fused LoRA): 1 step
DDIM trailing for SD1.5/SDXL, 4 Euler steps on the trailing sigmas for SD3 (the release's Hyper-SD3 4-step recipe),
8 for FLUX.1-dev (Hyper-FLUX's 8-step recipe, embedded guidance 3.5).

Runs the real code path: random-weight components of a registered architecture, the TSCD LightningModule
(discriminator on when --w-adv > 0; a transformer has none: docs/flow.md) under Lightning's Trainer with the chosen precision. Meant for a GPU:

    python benchmarks/sd_train_memory.py --arch sd15 --resolution 512 --micro-batches 1 2 4 8 --device cuda
    python benchmarks/sd_train_memory.py --arch sdxl --resolution 1024 --micro-batches 1 2 --device cuda
    python benchmarks/sd_train_memory.py --arch sd3 --resolution 1024 --micro-batches 1 4 --device cuda
    python benchmarks/sd_train_memory.py --arch flux --resolution 1024 --micro-batches 1 2 --device cuda

On a CPU (`--arch tiny-sd15 --device cpu`) it runs as a smoke test; peak memory is then not reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from hsd.config import load_config
from hsd.data.batch import EpochLoader, IndexedBatches
from hsd.diffusion.schedule import NoiseSchedule
from hsd.lit.tscd import TSCDModule
from hsd.models.components import build_components
from hsd.models.conditioning import LatentEncoder, PipelineText, TextConditioner
from hsd.models.quantize import quantize_frozen
from hsd.models.discriminator import build_discriminator
from hsd.models.dit import DIT_ARCHS, build_dit, image_tokens
from hsd.models.lora import attach_lora
from hsd.pipelines.recipes import PRESETS


class StepTimer(L.Callback):
    def __init__(self):
        self.times, self.t0 = [], 0.0

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._sync(module)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._sync(module)
        self.times.append(time.perf_counter() - self.t0)


def measure(comps, args, micro: int, checkpointing: bool) -> tuple[float, float | None]:
    """(median s/step after warm-up, peak GiB or None on CPU) for `args.steps` TSCD updates."""
    unet, w_adv = comps.unet, adversarial(comps, args)
    unet.disable_gradient_checkpointing()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    cfg = load_config([], [f"tscd.stages=[{{k: 2, grid_steps: 48, w_adv: {w_adv}}}]", "tscd.loss=huber",
                           "tscd.adv.hidden=256"])  # the SD recipe's k = 2 stage
    disc = build_discriminator(unet, cfg.tscd.adv) if w_adv else None  # the recipe's: all blocks, conditioned
    text = PipelineText(comps) if comps.family in FLOW else TextConditioner(comps.family, comps.text_encoders,
                                                                              comps.tokenizers)
    enc = LatentEncoder(comps.vae, text, args.resolution)
    schedule = NoiseSchedule.from_scheduler(comps.scheduler, image_tokens(comps.vae, args.resolution))

    def batch(i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"pixels": torch.rand(micro, 3, args.resolution, args.resolution, generator=g) * 2 - 1,
                "captions": ["a photograph of an astronaut riding a horse"] * micro}

    if getattr(args, "cached", False):  # as a data.cache run: the batch arrives encoded, no encoder on the device
        device = next(unet.parameters()).device
        enc.to(device)
        encoded = {k: v for k, v in enc(batch(0), torch.Generator().manual_seed(0)).items()
                   if k in ("x0", "cond", "uncond")}
        encoded = torch.utils._pytree.tree_map(lambda t: t.cpu() if torch.is_tensor(t) else t, encoded)
        enc.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        enc = None

        def batch(i: int) -> dict:  # noqa: F811 (the cached run's batch)
            return dict(encoded)
    module = TSCDModule(unet, schedule, cfg.tscd.stages[0], cfg.tscd, encoder=enc, disc=disc)

    return timed_fit(module, args, batch)


def timed_fit(module, args, batch_fn) -> tuple[float, float | None]:
    """(median s per batch after `args.warmup` batches, peak GiB or None on CPU) of `args.steps` batches."""
    n = args.warmup + args.steps
    timer = StepTimer()
    trainer = L.Trainer(max_steps=n * module.steps_per_update, accelerator="gpu" if args.device == "cuda" else "cpu",
                        devices=1, precision=args.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=EpochLoader(IndexedBatches(batch_fn, 0, n)))
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return statistics.median(timer.times[args.warmup:]), peak


def adversarial(comps, args) -> float:
    """--w-adv, or 0 on a transformer (the discriminator reads UNet blocks)."""
    return 0.0 if comps.family in FLOW else args.w_adv


FLOW = ("sd3", "flux")
# the release's preset each family is timed at, as (steps, guidance): Hyper-SD3 4-step at CFG 3 (two forwards a step),
# Hyper-FLUX 8-step at embedded guidance 3.5 (one forward); SD1.5/SDXL one DDIM-trailing step without CFG
RECIPES = {family: (PRESETS[name]["steps"][0], PRESETS[name]["guidance"])
           for family, name in {"sd3": "hyper-sd3-4", "flux": "hyper-flux-8"}.items()}


def generation_steps(comps) -> int:
    return RECIPES.get(comps.family, (1, 0.0))[0]


def generation_latency(comps, args) -> tuple[float, float]:
    """Median seconds per k-step image (`generation_steps`): hsd's ImageGenerator vs. the stock pipeline call, same
    pipe object and scheduler (DDIM trailing, guidance 0; SD3 / FLUX: Euler on the trailing sigmas at the
    release's preset, `RECIPES`)."""
    from hsd.pipelines.generate import ImageGenerator
    from hsd.worlds.sd import student_pipeline
    flow, (k, guidance) = comps.family in FLOW, RECIPES.get(comps.family, (1, 0.0))
    pipe, extra = student_pipeline(comps, k)  # the k-step student's sampler, as the training samples use it
    extra.pop("guidance_scale")  # the recipe's guidance instead, for both arms
    pipe.to(args.device, dtype=comps.unet.dtype)  # one dtype: the frozen weights'
    pipe.set_progress_bar_config(disable=True)
    ours = ImageGenerator(pipe, "euler" if flow else "ddim", None if flow else 0.0, {"model": args.arch})
    prompt, size = "a photograph of an astronaut riding a horse", args.resolution
    stock = lambda: pipe(prompt, num_inference_steps=k, guidance_scale=guidance, height=size,  # noqa: E731
                         width=size, generator=torch.Generator().manual_seed(0), **extra).images
    arms = {"hsd": lambda: ours.generate([prompt], k, [0], guidance=guidance, height=size, width=size),
            "stock": stock}
    times = {arm: [] for arm in arms}
    for r in range(2 + args.steps):
        for arm, fn in arms.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times[arm].append(time.perf_counter() - t0)
    return statistics.median(times["hsd"]), statistics.median(times["stock"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tiny-sd15")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--frozen-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--w-adv", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quantize", default="none", choices=["none", "int8", "fp8", "nf4"],
                   help="the frozen denoiser's Linear weights (model.quantize, torchao)")
    p.add_argument("--cached", action="store_true",
                   help="conditioning and latents encoded once, text encoders and VAE moved off the device "
                        "(data.cache)")
    return p


def prepare(args):
    """Random-weight components with the frozen weights in `args.frozen_dtype` and an fp32 rank-64 LoRA."""
    comps = build_dit(args.arch) if args.arch in DIT_ARCHS else build_components(args.arch)
    frozen = getattr(torch, args.frozen_dtype)
    comps.unet.to(frozen)
    for e in comps.text_encoders:
        e.to(frozen)
    quantize_frozen(comps.unet, getattr(args, "quantize", "none"))  # before the LoRA, as hsd.train does
    torch.manual_seed(0)
    attach_lora(comps.unet, 64, 64, flux_targets() if comps.family == "flux" else None)
    for prm in comps.unet.parameters():
        if prm.requires_grad:
            prm.data = prm.data.float()
    return comps


def flux_targets() -> list[str]:
    """The FLUX recipe's LoRA modules, as experiments/flux/tscd.yaml sets them."""
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "experiments" / "flux" / "tscd.yaml"
    return list(load_config([str(path)], [], inputs=False).lora.targets)


def main() -> None:
    args = parser().parse_args()
    comps = prepare(args)
    print(f"{args.arch} at {args.resolution}px, {args.precision}, frozen weights {args.frozen_dtype}, "
          f"LoRA rank 64, discriminator {'on' if adversarial(comps, args) else 'off'}, device {args.device}, base "
          f"quantize {args.quantize}, {'cached conditioning' if args.cached else 'encoders on the device'}")
    print("| micro-batch | grad. checkpointing | s/step | images/s | peak GiB |\n|---|---|---|---|---|")
    for micro in args.micro_batches:
        for ckpt in (False, True):
            try:
                sec, peak = measure(comps, args, micro, ckpt)
                mem = f"{peak:.1f}" if peak is not None else "n/a (CPU)"
                print(f"| {micro} | {'on' if ckpt else 'off'} | {sec:.3f} | {micro / sec:.2f} | {mem} |", flush=True)
            except torch.OutOfMemoryError:
                print(f"| {micro} | {'on' if ckpt else 'off'} | OOM | | |", flush=True)
                torch.cuda.empty_cache()
    comps.unet.disable_adapters()  # generation latency of the base architecture; a fused LoRA costs nothing
    ours, stock = generation_latency(comps, args)
    print(f"{generation_steps(comps)}-step generation: hsd {ours * 1000:.1f} ms, stock pipeline {stock * 1000:.1f} ms, "
          f"ratio {ours / stock:.3f}")


if __name__ == "__main__":
    main()
