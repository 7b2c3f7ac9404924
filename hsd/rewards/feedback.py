"""The feedback losses of Hyper-SD §3.2 as one module, shared by the feedback and DMD stages.

L_feedback = L_aes (Eq. 15: sum_d w_d ReLU(alpha_d - r_d(x'_0, c)) over differentiable rewards)
           + w_inst * L_percep (Eq. 16: SOLO's loss on x'_0 denoised from a diffused COCO image, with its caption,
             against its ground-truth instances).
The rewards come from the world: the lab's exact class log-likelihood (hsd.worlds.lab), or hsd.scorers' scorers
on VAE-decoded images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from ..diffusion.schedule import NoiseSchedule
from ..diffusion.segments import inference_timesteps
from ..errors import ConfigError
from ..losses.feedback import reward_hinge
from ..models.conditioning import vae_encode

if TYPE_CHECKING:
    from ..config import Feedback


class Student(Protocol):
    """What the feedback losses need of a stage: its schedule, its student's network output (used without gradient), its
    one-step x'_0 with gradient to the trained weights, and its ReFL grid."""
    schedule: NoiseSchedule
    refl: Refl

    def student_out(self, x: Tensor, t: Tensor, cond) -> Tensor: ...

    def denoise(self, x_t: Tensor, t: Tensor, cond) -> Tensor: ...


class VaeDecoder(nn.Module):
    """SD latents -> pixels in [0, 1] through the frozen VAE decoder, with gradient to the latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor) -> Tensor:
        with torch.autocast(latents.device.type, enabled=False):  # the SDXL VAE overflows in half precision
            scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            shift = self.vae.config.get("shift_factor")  # SD3 / FLUX VAEs: latents are (z - shift) * scale
            x = self.vae.decode(scaled + shift if shift else scaled).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)  # ReFL's mapping; saturated pixels pass no gradient

    def encode(self, pixels: Tensor, g: torch.Generator) -> Tensor:
        """Pixels in [0, 1] -> latents (no gradient)."""
        return vae_encode(self.vae, pixels * 2 - 1, g)


class ScorerRewards(nn.Module):
    """SD rewards: x'_0 latents -> decoded pixels -> differentiable 224 crop -> each scorer of hsd.scorers."""

    def __init__(self, decoder: VaeDecoder, scorers: dict[str, nn.Module]):
        super().__init__()
        self.decoder, self.scorers = decoder, nn.ModuleDict(scorers)

    def forward(self, x0: Tensor, batch: dict) -> dict[str, Tensor]:
        from hsd.scorers.images import resize_crop
        crops = resize_crop(self.decoder(x0))
        return {name: s(crops, batch["captions"]).float() for name, s in self.scorers.items()}


class Refl:
    """ReFL's sampling on the student's `steps`-step DDIM-trailing grid: from grid step i0, without gradient, down
    to a stop drawn from the grid steps in t_range (at or after i0), then one step with gradient to x'_0."""

    def __init__(self, T: int, steps: int, t_range: list[int]):
        self.grid = inference_timesteps(T, steps)  # descending: T-1, ..., T/steps - 1
        lo, hi = t_range
        self.stops = [i for i, t in enumerate(self.grid.tolist()) if lo <= t <= hi]
        if not self.stops:
            raise ConfigError(f"feedback.t_range {t_range} holds none of the {steps}-step grid's timesteps "
                              f"{self.grid.tolist()}")

    def index_at_or_below(self, t: int) -> int:
        """The first grid step at or below timestep t (the last one if none is)."""
        return next((i for i, s in enumerate(self.grid.tolist()) if s <= t), len(self.grid) - 1)

    def x0(self, stage: Student, x: Tensor, i0: int, cond, g: torch.Generator) -> Tensor:
        """x at grid step i0 -> (no gradient) the stop j -> x'_0 (gradient to the trained weights)."""
        stops = [j for j in self.stops if j >= i0] or [i0]
        j = stops[int(torch.randint(len(stops), (1,), generator=g))]
        at = [torch.full((x.shape[0],), int(t), device=x.device) for t in self.grid]
        with torch.no_grad():
            for i in range(i0, j):
                x = stage.schedule.jump(x, stage.student_out(x, at[i], cond), at[i], at[i + 1])
        return stage.denoise(x, at[j], cond)


class InstanceTerm(nn.Module):
    """Eq. 16 for one batch: COCO images -> latents -> diffused to x_ta (t_a: the ReFL grid step at or below
    `start`) -> denoised along the grid without gradient to a stop in t_range -> x'_0 with gradient, all conditioned
    on one of each image's COCO captions -> decoded -> SOLO loss against its ground-truth instances."""

    def __init__(self, coco, loss: nn.Module, decoder: VaeDecoder, size: int, text: nn.Module, start: int):
        super().__init__()
        self.coco, self.loss, self.decoder, self.size, self.text, self.start = coco, loss, decoder, size, text, start

    def forward(self, stage: Student, refl: Refl, batch_size: int, g: torch.Generator, device) -> Tensor:
        picks = torch.randint(len(self.coco), (batch_size,), generator=g).tolist()
        pixels, instances = zip(*(self.coco.sample(i, self.size) for i in picks))
        captions = [self.coco.caption(i, g) for i in picks]
        x0 = self.decoder.encode(torch.stack(pixels).to(device), g)
        i_a = refl.index_at_or_below(self.start)
        t_a = torch.full((batch_size,), int(refl.grid[i_a]), device=device)
        x_ta = stage.schedule.noise(x0, torch.randn(x0.shape, generator=g).to(x0), t_a)
        cond = self.text(captions, target_size=(self.size, self.size))
        return self.loss(self.decoder(refl.x0(stage, x_ta, i_a, cond, g)), list(instances))


class FeedbackLoss(nn.Module):
    """{term: loss} for generated x'_0: "reward" (Eq. 15) and, with an instance term, "instance" (Eq. 16)."""

    def __init__(self, cfg: Feedback, rewards: nn.Module | None, instance: InstanceTerm | None = None):
        super().__init__()
        self.cfg, self.rewards, self.instance = cfg, rewards, instance

    def forward(self, x0: Tensor, batch: dict, stage: Student, g: torch.Generator) -> tuple[dict[str, Tensor],
                                                                                        dict[str, Tensor]]:
        """(losses, rewards): the weighted terms to sum, and the raw mean rewards to log."""
        losses, scores = {}, {}
        if self.rewards is not None and self.cfg.rewards:
            r = self.rewards(x0, batch)
            r = {d: r[d] for d in self.cfg.rewards}
            losses["reward"] = reward_hinge(r, {d: c.margin for d, c in self.cfg.rewards.items()},
                                            {d: c.weight for d, c in self.cfg.rewards.items()})
            scores = {d: v.detach().mean() for d, v in r.items()}
        if self.instance is not None and self.cfg.instance_weight:
            loss = self.instance(stage, stage.refl, x0.shape[0], g, x0.device)
            losses["instance"] = self.cfg.instance_weight * loss
        return losses, scores

