"""TSCD as a LightningModule (Hyper-SD §3.1, Algorithm 1): one stage, k segments, any world.

The UNet carries a peft LoRA: adapters on = student Theta, adapters off = frozen teacher (or, with
tscd.teacher = previous, the previous stage's LoRA), LoRA tensors swapped for their EMA = target Theta^-. Where the
stage has w_adv > 0, a discriminator on the frozen teacher's features is trained in alternation (manual
optimisation, one short method).
Lightning owns devices, precision, sharding, checkpoints and logging.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..data.batch import Batch, RawBatch
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.solvers import cat_cond
from ..models.denoisers import denoiser_kwargs
from ..losses.adversarial import d_loss, g_loss
from ..losses.consistency import tscd_terms
from ..models.adapters import PREVIOUS
from ..models.adapters import TSCD as ADAPTER
from ..models.discriminator import FeatureDiscriminator, denoiser_features
from ..models.ema import EMA
from .base import StageModule, adamw, no_checkpointing
from .consistency import ConsistencyPair

if TYPE_CHECKING:
    from ..config import TSCD, Stage


class TSCDModule(StageModule):
    def __init__(self, unet, schedule: NoiseSchedule, stage: Stage, cfg: TSCD, seed: int = 0,
                 encoder=None, disc: FeatureDiscriminator | None = None, fsdp: bool = False,
                 previous: bool = False):
        super().__init__(unet, schedule, seed, encoder, fsdp)
        if stage.w_adv > 0 and disc is None:
            raise ValueError(f"stage k={stage.k} has w_adv={stage.w_adv} but no discriminator was given")
        self.stage, self.cfg, self.accumulate = stage, cfg, cfg.accumulate
        self.disc = disc if stage.w_adv > 0 else None
        # Lightning counts every optimizer's step in global_step: 2 per update when D is trained too.
        self.steps_per_update = 2 if self.disc is not None else 1
        self.previous = previous  # the teacher is the previous stage's LoRA (its adapter, loaded by hsd.train)
        self.use_adapters()
        self.ema = EMA(self.adapters.params(ADAPTER))
        self.pair = ConsistencyPair(schedule, stage.k, stage.grid_steps, cfg, guided=not previous)

    # ---- the three network functions: student_out and teacher_out (StageModule), the EMA target ----
    def teacher_out(self, x: Tensor, t: Tensor, cond) -> Tensor:
        if not self.previous:
            return super().teacher_out(x, t, cond)
        with self.adapters.scope([PREVIOUS]):
            return self.out(x, t, cond)

    def ema_out(self, x: Tensor, t: Tensor, cond) -> Tensor:
        # every name checked once by tensors_for: strict=False would skip unknown ones
        return self.out(x, t, cond, tensors=self.ema.tensors_for(self.unet))

    def tscd_pair(self, batch: Batch, g: torch.Generator) -> tuple[Tensor, Tensor, dict]:
        """(student prediction, target), both projected to t_end (Eq. 14), and the draws that made them."""
        return self.pair(batch, g, self.student_out, self.teacher_out, self.ema_out)

    def logits(self, x: Tensor, t: Tensor, cond, start: list[Tensor] | None) -> list[Tensor]:
        """Discriminator logits of samples x at timesteps t, from the frozen teacher's features.

        This pass needs gradient (to x) with the LoRA off; checkpointed blocks would recompute it in backward
        with the LoRA back on, so it runs without gradient checkpointing.
        """
        with self.teacher(), no_checkpointing(self.unet):
            return self.disc(self.features(x, t, cond), start)

    def features(self, x: Tensor, t: Tensor, cond) -> list[Tensor]:
        return denoiser_features(self.unet, x, self.schedule.model_time(t), denoiser_kwargs(cond),
                                 self.cfg.adv.up_features, not self.fsdp)

    @torch.no_grad()
    def start_features(self, aux: dict) -> list[Tensor] | None:
        """The start point x_tn's features at t_n, which a conditioned discriminator sees beside each sample."""
        if not self.disc.conditioned:
            return None
        with self.teacher():
            return self.features(aux["x_tn"], aux["t_n"], aux["cond"])

    def training_step(self, batch: RawBatch, batch_idx: int) -> Tensor:
        g = self.generator(batch)
        batch = self.encode(batch, g)
        pred, target, aux = self.tscd_pair(batch, g)
        update = self.completes_update(batch)
        opts = self.optimizers()
        if self.disc is None:
            return self._generator_update(opts, pred, target, None, update, batch)
        t_adv = self._renoise_times(aux["t_end"], g)
        z_fake, z_real = (torch.randn(pred.shape, generator=g).to(pred) for _ in range(2))  # each its own noise
        noisy = lambda x, z: self.schedule.renoise(x, aux["t_end"], t_adv, z)  # noqa: E731  q(x_t' | x_t_end)
        cond, start = aux["cond"], self.start_features(aux)
        adv = lambda p, _: g_loss(self.logits(noisy(p, z_fake), t_adv, cond, start), self.cfg.adv.loss)  # noqa: E731
        self.toggle_optimizer(opts[0])
        loss = self._generator_update(opts[0], pred, target, adv, update, batch)
        self.untoggle_optimizer(opts[0])
        self.toggle_optimizer(opts[1])
        self._discriminator_update(opts[1], noisy(target, z_real), noisy(pred.detach(), z_fake), t_adv, cond, start,
                                   update)
        self.untoggle_optimizer(opts[1])
        return loss

    def _generator_update(self, opt, pred: Tensor, target: Tensor, adv, update: bool, batch: RawBatch) -> Tensor:
        s = self.stage
        terms = tscd_terms(pred, target, s.w_mse, self.cfg.loss, self.cfg.huber_c, s.w_adv, adv)
        self.log_grad_norms(terms, self.adapters.params(ADAPTER).values(), batch)
        loss = sum(terms.values())
        self.manual_backward(loss / self.cfg.accumulate)
        if update:
            self._step(opt, self.cfg.grad_clip)
            self.ema.update(self.adapters.params(ADAPTER), self.cfg.ema_decay)
        self.log(f"train/loss_k{s.k}", loss, prog_bar=True)
        return loss.detach()

    def _discriminator_update(self, opt, real: Tensor, fake: Tensor, t: Tensor, cond, start, update: bool) -> None:
        with torch.no_grad(), self.teacher():  # frozen features need no graph: only the heads learn
            feats = self.features(torch.cat([real, fake]), torch.cat([t, t]), cat_cond(cond, cond))  # one forward
        both = None if start is None else [torch.cat([s, s]) for s in start]
        r, f = zip(*(logit.chunk(2) for logit in self.disc(feats, both)))
        loss = d_loss(list(r), list(f), self.cfg.adv.loss)
        self.manual_backward(loss / self.cfg.accumulate)
        if update:
            self._step(opt, self.cfg.grad_clip)
        self.log(f"train/d_loss_k{self.stage.k}", loss, prog_bar=True)

    def _renoise_times(self, t_end: Tensor, g: torch.Generator) -> Tensor:
        """t' ~ U[t_end, renoise_max T]: where both samples are re-noised to before the discriminator sees them."""
        t_hi = torch.full_like(t_end, int(self.cfg.adv.renoise_max * (self.schedule.T - 1)))
        u = torch.rand(t_end.shape[0], generator=g).to(t_end.device)
        return t_end + (u * (t_hi - t_end).clamp(min=0)).long()

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
