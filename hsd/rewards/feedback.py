"""The feedback losses of Hyper-SD §3.2 as one module, shared by the feedback and DMD stages.

L_feedback = L_aes (Eq. 15: sum_d w_d ReLU(alpha_d - r_d(x'_0, c)) over differentiable rewards)
           + w_inst * L_percep (Eq. 16: SOLO's loss on x'_0 denoised from a noised COCO image, against its
             ground-truth instances).
The rewards come from the world: the lab's exact class log-likelihood (hsd.worlds.lab), or hsd.scorers' scorers
on VAE-decoded images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from ..diffusion.schedule import NoiseSchedule, add_noise
from ..losses.feedback import reward_hinge
from ..models.conditioning import vae_encode

if TYPE_CHECKING:
    from ..config import Feedback

# denoise(x_t, t [B], cond) -> x'_0 with gradient to the trained weights
Denoise = Callable[[Tensor, Tensor, object], Tensor]


class VaeDecoder(nn.Module):
    """SD latents -> pixels in [0, 1] through the frozen VAE decoder, with gradient to the latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor) -> Tensor:
        with torch.autocast(latents.device.type, enabled=False):  # the SDXL VAE overflows in half precision
            x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
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


class InstanceTerm(nn.Module):
    """Eq. 16 for one batch: COCO images -> latents -> x_t at t in [t_left, t_right] -> x'_0 (one step with
    gradient, conditioned on the empty prompt: instance files carry no captions) -> decoded -> SOLO loss."""

    def __init__(self, coco, loss: nn.Module, decoder: VaeDecoder, size: int):
        super().__init__()
        self.coco, self.loss, self.decoder, self.size = coco, loss, decoder, size

    def forward(self, denoise: Denoise, schedule: NoiseSchedule, uncond, t_range: list[int], batch_size: int,
                g: torch.Generator, device) -> Tensor:
        picks = torch.randint(len(self.coco), (batch_size,), generator=g).tolist()
        pixels, instances = zip(*(self.coco.sample(i, self.size) for i in picks))
        x0 = self.decoder.encode(torch.stack(pixels).to(device), g)
        t = torch.randint(t_range[0], t_range[1] + 1, (batch_size,), generator=g).to(device)
        x_t = add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), *schedule.coeffs(t, x0))
        return self.loss(self.decoder(denoise(x_t, t, uncond)), list(instances))


class FeedbackLoss(nn.Module):
    """{term: loss} for generated x'_0: "reward" (Eq. 15) and, with an instance term, "instance" (Eq. 16)."""

    def __init__(self, cfg: Feedback, rewards: nn.Module | None, instance: InstanceTerm | None = None):
        super().__init__()
        self.cfg, self.rewards, self.instance = cfg, rewards, instance

    def forward(self, x0: Tensor, batch: dict, denoise: Denoise, schedule: NoiseSchedule,
                g: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(losses, rewards): the weighted terms to sum, and the raw mean rewards to log."""
        losses, scores = {}, {}
        if self.rewards is not None and self.cfg.rewards:
            r = self.rewards(x0, batch)
            r = {d: r[d] for d in self.cfg.rewards}
            losses["reward"] = reward_hinge(r, {d: c.margin for d, c in self.cfg.rewards.items()},
                                            {d: c.weight for d, c in self.cfg.rewards.items()})
            scores = {d: v.detach().mean() for d, v in r.items()}
        if self.instance is not None and self.cfg.instance_weight:
            loss = self.instance(denoise, schedule, batch["uncond"], self.cfg.t_range, x0.shape[0], g, x0.device)
            losses["instance"] = self.cfg.instance_weight * loss
        return losses, scores

