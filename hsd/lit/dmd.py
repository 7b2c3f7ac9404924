"""One-step enhancement (Hyper-SD §3.3): distribution matching distillation with a fake score network.

generator  the student from the noise z at one timestep (999: the unified LoRA, trained on as the "default"
           adapter; 800: the one-step UNet, optionally a full fine-tune of a fused copy)
real score the frozen teacher (adapters off) with CFG
fake score a LoRA of its own ("fake") on the teacher, or a full trainable copy, fitted to the generator's
           samples by the denoising loss
Generator loss = DMD (Eq. 10, DMD2's normalisation) + lambda_mse * MSE to the teacher's multi-step result from
the same z + w_feedback * the feedback losses + w_consistency * the last TSCD stage's consistency loss (so the
unified LoRA, which DMD trains only at its one-step timestep, stays consistent at 2-8 steps). Each batch: one
generator update, then `fake_updates` fake-score updates, each on fresh generator samples as DMD2 draws them
(manual optimisation). The DMD gradient reads noise levels in [t_min, t_max] T; the fake score learns all of them.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import RawBatch
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.segments import inference_timesteps
from ..diffusion.solvers import guided, teacher_step, with_guidance
from ..losses.consistency import distance
from ..losses.dmd import dmd_loss, fake_score_loss
from ..models.adapters import FAKE, TSCD
from ..rewards.feedback import Refl
from .base import StageModule
from .consistency import ConsistencyPair

if TYPE_CHECKING:
    from ..config import DMD
    from ..rewards.feedback import FeedbackLoss

GENERATOR = TSCD  # the LoRA generator is the TSCD LoRA trained on (the unified LoRA)


class DMDModule(StageModule):
    def __init__(self, unet, schedule: NoiseSchedule, cfg: DMD, feedback: FeedbackLoss | None = None, seed: int = 0,
                 encoder=None, fsdp: bool = False, generator_unet: nn.Module | None = None,
                 fake_unet: nn.Module | None = None, consistency: ConsistencyPair | None = None):
        super().__init__(unet, schedule, seed, encoder, fsdp)
        self.cfg, self.feedback, self.consistency = cfg, feedback, consistency
        self.gen_unet, self.fake_unet = generator_unet, fake_unet  # None: the UNet's own adapter
        self.steps_per_update = 1 + cfg.fake_updates
        self.active, self.trained = (GENERATOR,), (GENERATOR,) if generator_unet is None else ()
        self.use_adapters()
        self.t_lo, self.t_hi = int(cfg.t_min * (schedule.T - 1)), int(cfg.t_max * (schedule.T - 1))
        if feedback is not None:  # the instance term's ReFL grid (the feedback section's)
            self.refl = Refl(schedule.T, feedback.cfg.steps, feedback.cfg.t_range)

    # ---- the three networks ----
    def student_out(self, x: Tensor, t: Tensor, cond) -> Tensor:
        """The generator: the UNet's "default" adapter, or the full copy."""
        return self.out(x, t, cond, self.gen_unet)

    def fake_scope(self):
        """Context in which self.unet (or the full copy) is the fake score, its tensors trainable."""
        return nullcontext() if self.fake_unet is not None else self.adapters.scope([FAKE], [FAKE])

    def fake_out(self, x: Tensor, t: Tensor, cond) -> Tensor:
        with self.fake_scope():
            return self.out(x, t, cond, self.fake_unet)

    # ---- samples and targets ----
    def generate(self, z: Tensor, cond) -> Tensor:
        return self.denoise(z, torch.full((z.shape[0],), self.cfg.timestep, device=z.device), cond)

    def noised(self, x0: Tensor, g: torch.Generator, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor,
                                                                                                   Tensor]:
        """(x_t, t, noise) with t ~ U{lo, ..., hi} (default: every timestep, the fake score's range in DMD2)."""
        hi = self.schedule.T - 1 if hi is None else hi
        t = torch.randint(lo, hi + 1, (x0.shape[0],), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        return self.schedule.noise(x0, noise, t), t, noise

    @torch.no_grad()
    def scores(self, x0: Tensor, cond, uncond, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """x0 predictions of the real (teacher, CFG) and fake scores from one noising of x0 at t in
        [t_min T, t_max T] (DMD2's range for the distribution-matching gradient)."""
        x_t, t, _ = self.noised(x0, g, self.t_lo, self.t_hi)
        real = self.schedule.x0(x_t, guided(self.teacher_out, x_t, t, cond, uncond, self.cfg.guidance), t)
        return real, self.schedule.x0(x_t, self.fake_out(x_t, t, cond), t)

    @torch.no_grad()
    def teacher_sample(self, z: Tensor, cond, uncond) -> Tensor:
        """The regression target: the teacher's CFG DDIM-trailing sample from the same noise."""
        ts = inference_timesteps(self.schedule.T, self.cfg.mse_steps).tolist() + [-1]
        x = z
        for t, s in zip(ts[:-1], ts[1:]):
            at, to = (torch.full((z.shape[0],), v, device=z.device) for v in (t, s))
            x = teacher_step(self.schedule, self.teacher_out, x, at, to, cond, uncond, self.cfg.guidance)
        return x

    # ---- one batch: a generator update, then the fake score's ----
    def training_step(self, batch: RawBatch, batch_idx: int) -> Tensor:
        g = self.generator(batch)
        batch = self.encode(batch, g)
        # a guidance-embedded generator and fake score (FLUX.1-dev) are told the real score's guidance
        cond, uncond = (with_guidance(batch[k], self.cfg.guidance) for k in ("cond", "uncond"))
        like = batch["x0"]
        opt_g, opt_f = self.optimizers()
        z = torch.randn(like.shape, generator=g).to(like)
        x0 = self.generate(z, cond)
        losses = {"dmd": dmd_loss(x0, *self.scores(x0.detach(), cond, uncond, g))}
        if self.cfg.w_mse:
            losses["mse"] = self.cfg.w_mse * F.mse_loss(x0.float(), self.teacher_sample(z, cond, uncond).float())
        if self.consistency is not None and self.cfg.w_consistency:
            losses["consistency"] = self.cfg.w_consistency * self.consistency_loss(batch, g)
        rewards = {}
        if self.feedback is not None and self.cfg.w_feedback:
            fb, rewards = self.feedback(x0, batch, self, g)
            losses |= {k: self.cfg.w_feedback * v for k, v in fb.items()}
        self.log_grad_norms(losses, self.generator_tensors().values(), batch)
        loss = torch.stack(list(losses.values())).sum()
        self.manual_backward(loss)
        self._step(opt_g, self.cfg.grad_clip)
        fake = [self._fake_update(opt_f, like, cond, g) for _ in range(self.cfg.fake_updates)]
        self.log("train/dmd_loss", loss, prog_bar=True)
        self.log_dict({f"train/dmd_{k}": v for k, v in losses.items()} | {"train/fake_loss": torch.stack(fake).mean()}
                      | {f"train/reward_{k}": v for k, v in rewards.items()})
        return loss.detach()

    def consistency_loss(self, batch, g: torch.Generator) -> Tensor:
        """The last TSCD stage's loss on the generator, its target the generator itself without gradient (the
        online target of LCM-LoRA and PCM: DMD keeps no EMA)."""
        pred, tgt, _ = self.consistency(batch, g, self.student_out, self.teacher_out, self.student_out)
        tscd = self.consistency.cfg
        return distance(pred, tgt, tscd.loss, tscd.huber_c)

    def _fake_update(self, opt, like: Tensor, cond, g: torch.Generator) -> Tensor:
        """One fake-score step on fresh generator samples (DMD2 draws new ones for every fake update)."""
        with torch.no_grad():
            x0 = self.generate(torch.randn(like.shape, generator=g).to(like), cond)
        x_t, t, noise = self.noised(x0, g)
        with self.fake_scope():  # forward and backward with the fake adapter trainable
            loss = fake_score_loss(self.out(x_t, t, cond, self.fake_unet), self.schedule.target(x0, noise))
            self.manual_backward(loss)
        self._step(opt, self.cfg.grad_clip)
        return loss.detach()

    # ---- what trains, and what checkpoints hold ----
    def generator_tensors(self) -> dict[str, Tensor]:
        return (self.adapters.params(GENERATOR) if self.gen_unet is None
                else dict(self.gen_unet.named_parameters()))

    def fake_tensors(self) -> dict[str, Tensor]:
        return self.adapters.params(FAKE) if self.fake_unet is None else dict(self.fake_unet.named_parameters())

    def trained_copies(self) -> list[nn.Module]:
        return [m for m in (self.gen_unet, self.fake_unet) if m is not None]

    def configure_optimizers(self):
        return [torch.optim.AdamW(self.generator_tensors().values(), lr=self.cfg.lr, weight_decay=0.0),
                torch.optim.AdamW(self.fake_tensors().values(), lr=self.cfg.fake_lr, weight_decay=0.0)]

    def trained_tensors(self) -> dict[str, Tensor]:
        return ({f"gen.{n}": p for n, p in self.generator_tensors().items()}
                | {f"fake.{n}": p for n, p in self.fake_tensors().items()})
