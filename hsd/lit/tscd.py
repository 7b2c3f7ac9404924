"""TSCD as a LightningModule (Hyper-SD §3.1, Algorithm 1): one stage, k segments.

The UNet carries a peft LoRA: adapters on = student Theta, adapters off = frozen teacher, LoRA tensors
swapped for their EMA = target Theta^-. Lightning owns devices, precision, checkpoints and logging.
"""
from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch import Tensor
from torch.func import functional_call

from ..config import TSCD, Stage
from ..diffusion.schedule import NoiseSchedule, add_noise
from ..diffusion.segments import ddim_grid, sample_times
from ..diffusion.solvers import ddim_step, teacher_step
from ..losses.consistency import tscd_loss
from ..models.ema import EMA
from ..models.lora import lora_params


class TSCDModule(L.LightningModule):
    def __init__(self, unet, schedule: NoiseSchedule, stage: Stage, cfg: TSCD, seed: int = 0,
                 adversarial: Callable[[Tensor, Tensor], Tensor] | None = None):
        super().__init__()
        if stage.w_adv > 0 and adversarial is None:
            raise ValueError(f"stage k={stage.k} has w_adv={stage.w_adv} but no discriminator is configured"
                             " (the lab world has none: set w_adv: 0)")
        self.unet, self.schedule, self.stage, self.cfg, self.seed = unet, schedule, stage, cfg, seed
        self.adversarial = adversarial
        self.ema = EMA(lora_params(unet))
        self.grid = ddim_grid(schedule.T, stage.grid_steps)  # CPU: times are drawn with a CPU generator
        self.strict_loading = False  # checkpoints hold only the LoRA, its EMA and optimizer state

    # ---- the three eps functions: student, frozen teacher, EMA target ----
    def student_eps(self, x: Tensor, t: Tensor, cond) -> Tensor:
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def teacher_eps(self, x: Tensor, t: Tensor, cond) -> Tensor:
        self.unet.disable_adapters()
        try:
            return self.unet(x, t, encoder_hidden_states=cond).sample
        finally:
            self.unet.enable_adapters()

    def ema_eps(self, x: Tensor, t: Tensor, cond) -> Tensor:
        return functional_call(self.unet, self.ema.tensors(), (x, t), {"encoder_hidden_states": cond},
                               strict=False).sample

    def tscd_pair(self, batch: dict, g: torch.Generator) -> tuple[Tensor, Tensor, dict]:
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

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # Seeded by the batch's global index, so a resumed run draws exactly what the uninterrupted one did.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(batch["index"]) + 7)
        pred, target, _ = self.tscd_pair(batch, g)
        s = self.stage
        loss = tscd_loss(pred, target, s.w_mse, self.cfg.loss, self.cfg.huber_c, s.w_adv, self.adversarial)
        self.log(f"train/loss_k{s.k}", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # EMA right after the step, before any callback (e.g. a checkpoint) sees the batch end.
        super().optimizer_step(*args, **kwargs)
        self.ema.update(lora_params(self.unet), self.cfg.ema_decay)

    def configure_optimizers(self):
        return torch.optim.AdamW(lora_params(self.unet).values(), lr=self.cfg.lr,
                                 weight_decay=self.cfg.weight_decay)

    def _checkpoint_keys(self) -> set[str]:
        return {f"unet.{n}" for n in lora_params(self.unet)} | {f"ema.{k}" for k in self.ema.state_dict()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self._checkpoint_keys() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} LoRA/EMA tensors, e.g. {sorted(missing)[0]}")
