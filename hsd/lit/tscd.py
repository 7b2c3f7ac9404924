"""TSCD as a LightningModule (Hyper-SD §3.1, Algorithm 1): one stage, k segments, any world.

The UNet carries a peft LoRA: adapters on = student Theta, adapters off = frozen teacher, LoRA tensors
swapped for their EMA = target Theta^-. Where the stage has w_adv > 0, a discriminator on the frozen
teacher's encoder features is trained in alternation (manual optimisation, one short method).
Lightning owns devices, precision, sharding, checkpoints and logging.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import functional_call

from ..data.batch import Batch, RawBatch
from ..diffusion.schedule import NoiseSchedule, add_noise, renoise
from ..diffusion.segments import ddim_grid, sample_times
from ..diffusion.solvers import cat_cond, ddim_step, teacher_step
from ..losses.adversarial import d_loss, g_loss
from ..losses.consistency import tscd_loss
from ..models.adapters import TSCD as ADAPTER
from ..models.discriminator import FeatureDiscriminator, encoder_features
from ..models.ema import EMA
from .base import StageModule, adamw, no_checkpointing, unet_kwargs

if TYPE_CHECKING:
    from ..config import TSCD, Stage


class TSCDModule(StageModule):
    def __init__(self, unet, schedule: NoiseSchedule, stage: Stage, cfg: TSCD, seed: int = 0,
                 encoder=None, disc: FeatureDiscriminator | None = None, fsdp: bool = False):
        super().__init__(unet, schedule, seed, encoder, fsdp)
        if stage.w_adv > 0 and disc is None:
            raise ValueError(f"stage k={stage.k} has w_adv={stage.w_adv} but no discriminator was given")
        self.stage, self.cfg, self.accumulate = stage, cfg, cfg.accumulate
        self.disc = disc if stage.w_adv > 0 else None
        # Lightning counts every optimizer's step in global_step: 2 per update when D is trained too.
        self.steps_per_update = 2 if self.disc is not None else 1
        self.use_adapters()
        self.ema = EMA(self.adapters.params(ADAPTER))
        self.grid = ddim_grid(schedule.T, stage.grid_steps)  # CPU: times are drawn with a CPU generator

    # ---- the three eps functions: student_eps and teacher_eps (StageModule), the EMA target ----
    def ema_eps(self, x: Tensor, t: Tensor, cond) -> Tensor:
        return functional_call(self.unet, self.ema.tensors(), (x, t), unet_kwargs(cond), strict=False).sample

    def tscd_pair(self, batch: Batch, g: torch.Generator) -> tuple[Tensor, Tensor, dict]:
        """(student prediction, target), both projected to t_end (Eq. 14), and the draws that made them.

        All randomness comes from g.
        """
        x0, cond, uncond = batch["x0"], batch["cond"], batch["uncond"]
        B, dev = x0.shape[0], x0.device
        ts = sample_times(self.grid, self.stage.k, self.schedule.T, B, g, self.cfg.t_end)
        t_n, t_prev, t_end = (v.to(dev) for v in (ts.t_n, ts.t_prev, ts.t_end))
        noise = torch.randn(x0.shape, generator=g).to(x0)
        if self.cfg.offset_noise:
            noise = noise + self.cfg.offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=g).to(x0)
        w = self.cfg.guidance_min + (self.cfg.guidance_max - self.cfg.guidance_min) * torch.rand(B, generator=g)
        x_tn = add_noise(x0, noise, *self.schedule.coeffs(t_n, x0))
        with torch.no_grad():
            x_prev = teacher_step(self.schedule, self.teacher_eps, x_tn, t_n, t_prev, cond, uncond, w.to(dev))
            target = ddim_step(self.schedule, x_prev, self.ema_eps(x_prev, t_prev, cond), t_prev, t_end)
        pred = ddim_step(self.schedule, x_tn, self.student_eps(x_tn, t_n, cond), t_n, t_end)
        return pred, target, {"x_tn": x_tn, "t_n": t_n, "t_prev": t_prev, "t_end": t_end, "w": w}

    def logits(self, x: Tensor, t: Tensor, cond) -> list[Tensor]:
        """Discriminator logits of samples x at timesteps t, from the frozen teacher's encoder features.

        This pass needs gradient (to x) with the LoRA off; checkpointed blocks would recompute it in backward
        with the LoRA back on, so it runs without gradient checkpointing.
        """
        with self.teacher(), no_checkpointing(self.unet):
            return self.disc(encoder_features(self.unet, x, t, unet_kwargs(cond), not self.fsdp))

    def training_step(self, batch: RawBatch, batch_idx: int) -> Tensor:
        g = self.generator(batch)
        batch = self.encode(batch, g)
        pred, target, aux = self.tscd_pair(batch, g)
        if "skipped" in batch:  # undecodable samples so far, summed over ranks
            self.log("data/skipped", float(batch["skipped"]), reduce_fx="sum", sync_dist=True)
        update = self.completes_update(batch)
        opts = self.optimizers()
        if self.disc is None:
            return self._generator_update(opts, pred, target, None, update)
        noisy, t_adv = self._renoiser(aux["t_end"], pred, g)
        adv = lambda p, _: g_loss(self.logits(noisy(p), t_adv, batch["cond"]), self.cfg.adv.loss)  # noqa: E731
        self.toggle_optimizer(opts[0])
        loss = self._generator_update(opts[0], pred, target, adv, update)
        self.untoggle_optimizer(opts[0])
        self.toggle_optimizer(opts[1])
        self._discriminator_update(opts[1], noisy(target), noisy(pred.detach()), t_adv, batch["cond"], update)
        self.untoggle_optimizer(opts[1])
        return loss

    def _generator_update(self, opt, pred: Tensor, target: Tensor, adv, update: bool) -> Tensor:
        s = self.stage
        loss = tscd_loss(pred, target, s.w_mse, self.cfg.loss, self.cfg.huber_c, s.w_adv, adv)
        self.manual_backward(loss / self.cfg.accumulate)
        if update:
            self._step(opt, self.cfg.grad_clip)
            self.ema.update(self.adapters.params(ADAPTER), self.cfg.ema_decay)
        self.log(f"train/loss_k{s.k}", loss, prog_bar=True)
        return loss.detach()

    def _discriminator_update(self, opt, real: Tensor, fake: Tensor, t: Tensor, cond, update: bool) -> None:
        with torch.no_grad(), self.teacher():  # frozen features need no graph: only the heads learn
            feats = encoder_features(self.unet, torch.cat([real, fake]), torch.cat([t, t]),
                                     unet_kwargs(cat_cond(cond, cond)), not self.fsdp)  # one batched forward
        r, f = zip(*(logit.chunk(2) for logit in self.disc(feats)))
        loss = d_loss(list(r), list(f), self.cfg.adv.loss)
        self.manual_backward(loss / self.cfg.accumulate)
        if update:
            self._step(opt, self.cfg.grad_clip)
        self.log(f"train/d_loss_k{self.stage.k}", loss, prog_bar=True)

    def _renoiser(self, t_end: Tensor, like: Tensor, g: torch.Generator):
        """(x -> a draw of q(x_t' | x_t_end), t'): real and fake get the same t' ~ U[t_end, renoise_max T] and
        the same noise."""
        t_hi = torch.full_like(t_end, int(self.cfg.adv.renoise_max * (self.schedule.T - 1)))
        u = torch.rand(like.shape[0], generator=g).to(like.device)
        t_adv = t_end + (u * (t_hi - t_end).clamp(min=0)).long()
        z = torch.randn(like.shape, generator=g).to(like)

        def noisy(x: Tensor) -> Tensor:
            return renoise(self.schedule, x, t_end, t_adv, z)
        return noisy, t_adv

    def configure_optimizers(self):
        opt_g = adamw(self.cfg.optimizer)(self.adapters.params(ADAPTER).values(), lr=self.cfg.lr,
                                           weight_decay=self.cfg.weight_decay)
        if self.disc is None:
            return opt_g
        return [opt_g, adamw(self.cfg.optimizer)(self.disc.parameters(), lr=self.cfg.adv.lr, betas=(0.0, 0.99))]

    # ---- checkpoints hold what training changes: the LoRA, its EMA, the discriminator ----
    def trained_tensors(self) -> dict[str, Tensor]:
        out = {f"unet.{n}": p for n, p in self.adapters.params(ADAPTER).items()}
        out |= {f"ema.{k}": v for k, v in self.ema.state_dict(keep_vars=True).items()}
        if self.disc is not None:
            out |= {f"disc.{k}": v for k, v in self.disc.state_dict(keep_vars=True).items()}
        return out
