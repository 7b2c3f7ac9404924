"""TSCD training step vs. a baseline step built the way diffusers' LCM-LoRA script builds it.

Both run on the same random-weight UNet (a registered architecture), batch and resolution, and both do a
VAE encode, text encode, student forward + backward, teacher CFG and a target forward, and an AdamW step.
Baseline: teacher cond and uncond as two forwards, a separate fp32 teacher UNet, fp32 throughout (the
script on a CPU). hsd: cond and uncond in one batched forward through the same UNet with its LoRA off, the
EMA target by functional_call, the empty-prompt embedding cached, under the run's
precision (bf16-mixed with the frozen weights stored in bf16, as experiments/sd15 sets model.frozen_dtype). Prints one ratio per hsd precision, measured
interleaved in one run.

    .venv/bin/python benchmarks/tscd_step.py --arch tiny-sd15 --resolution 64 --batch 8 --repeats 10
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from hsd.config import load_config
from hsd.diffusion.schedule import NoiseSchedule, add_noise, eps_to_x0
from hsd.lit.tscd import TSCDModule
from hsd.losses.consistency import tscd_loss
from hsd.models.components import build_components
from hsd.models.conditioning import LatentEncoder, TextConditioner
from hsd.models.lora import attach_lora, lora_params


def make_batch(B: int, res: int, g: torch.Generator) -> dict:
    return {"pixels": torch.rand(B, 3, res, res, generator=g) * 2 - 1,
            "captions": [f"a photo of object number {i}" for i in range(B)], "index": 0}


def hsd_step(module: TSCDModule, opt, batch: dict, g, precision: str) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        b = module.encoder(batch, g)
        pred, target, _ = module.tscd_pair(b, g)
        loss = tscd_loss(pred, target, 1.0, "huber", 1e-3)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lora_params(module.unet).values(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    module.ema.update(lora_params(module.unet), 0.95)


class LCMBaseline:
    """The LCM-LoRA script's step: separate fp32 teacher, two teacher forwards, target from the same UNet."""

    def __init__(self, comps, sched: NoiseSchedule, N: int = 50):
        # Its own copies (online UNet with LoRA, frozen teacher), so nothing set on hsd's UNet reaches it.
        self.c, self.unet, self.teacher, self.sched = comps, copy.deepcopy(comps.unet), copy.deepcopy(comps.unet), sched
        self.teacher.disable_adapters()
        self.topk = sched.T // N
        self.grid = torch.arange(1, N + 1) * self.topk - 1
        tok, enc = comps.tokenizers[0], comps.text_encoders[0]
        ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        self.uncond = enc(ids)[0]
        self.opt = torch.optim.AdamW(lora_params(self.unet).values(), lr=1e-4)

    def step(self, batch: dict, g) -> None:
        tok, enc, vae = self.c.tokenizers[0], self.c.text_encoders[0], self.c.vae
        with torch.no_grad():
            ids = tok(batch["captions"], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            emb = enc(ids)[0]
            x0 = vae.encode(batch["pixels"]).latent_dist.sample(generator=g) * vae.config.scaling_factor
        B = x0.shape[0]
        t = self.grid[torch.randint(len(self.grid), (B,), generator=g)]
        t_prev = (t - self.topk).clamp(min=0)
        noise = torch.randn(x0.shape, generator=g)
        a, s = self.sched.coeffs(t, x0)
        a_p, s_p = self.sched.coeffs(t_prev, x0)
        x_t = add_noise(x0, noise, a, s)
        w = (4 + 10 * torch.rand(B, generator=g)).reshape(B, 1, 1, 1)
        pred = eps_to_x0(x_t, self.unet(x_t, t, encoder_hidden_states=emb).sample, a, s)
        with torch.no_grad():
            e_c = self.teacher(x_t, t, encoder_hidden_states=emb).sample
            e_u = self.teacher(x_t, t, encoder_hidden_states=self.uncond.expand(B, -1, -1)).sample
            eps = e_c + w * (e_c - e_u)
            x_prev = a_p * eps_to_x0(x_t, eps, a, s) + s_p * eps
            target = eps_to_x0(x_prev, self.unet(x_prev, t_prev, encoder_hidden_states=emb).sample, a_p, s_p)
        loss = torch.mean(torch.sqrt((pred - target) ** 2 + 1e-6) - 1e-3)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params(self.unet).values(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tiny-sd15")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    comps = build_components(args.arch)
    attach_lora(comps.unet, 16, 16)
    sched = NoiseSchedule.from_scheduler(comps.scheduler)
    # The baseline's 50-step grid and guidance range (diffusers' LCM-LoRA script), misaligned for k = 8 on purpose:
    # the grid changes which timesteps are drawn, not the work of a step.
    cfg = load_config([], ["tscd.stages=[{k: 8, grid_steps: 50}]", "tscd.allow_misaligned_grid=true",
                           "tscd.guidance_min=5", "tscd.guidance_max=15"])
    base = LCMBaseline(comps, sched)

    def hsd(frozen: torch.dtype):
        """hsd's module as `hsd train` builds it: frozen UNet/text weights in model.frozen_dtype, LoRA fp32."""
        unet, text = copy.deepcopy(comps.unet).to(frozen), [copy.deepcopy(e).to(frozen) for e in comps.text_encoders]
        for p in lora_params(unet).values():
            p.data = p.data.float()
        enc = LatentEncoder(comps.vae, TextConditioner(comps.family, text, comps.tokenizers), args.resolution)
        module = TSCDModule(unet, sched, cfg.tscd.stages[0], cfg.tscd, encoder=enc)
        return module, torch.optim.AdamW(lora_params(unet).values(), lr=1e-4)

    fp32, bf16 = hsd(torch.float32), hsd(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    arms = {"baseline (LCM-LoRA script, fp32)": lambda b: base.step(b, g),
            "hsd fp32": lambda b: hsd_step(*fp32, b, g, "32-true"),
            "hsd bf16-mixed, frozen bf16": lambda b: hsd_step(*bf16, b, g, "bf16-mixed")}
    times = {k: [] for k in arms}
    for r in range(args.warmup + args.repeats):
        for name, fn in arms.items():  # interleaved, so drifts in machine load hit every arm alike
            batch = make_batch(args.batch, args.resolution, g)
            t0 = time.perf_counter()
            fn(batch)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    print(f"{args.arch} UNet, batch {args.batch}, {args.resolution}px, {args.repeats} steps each, "
          f"{torch.get_num_threads()} threads")
    ref = statistics.median(times["baseline (LCM-LoRA script, fp32)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:34s} median {med * 1000:8.1f} ms/step   ratio to baseline {med / ref:.3f}")


if __name__ == "__main__":
    main()
