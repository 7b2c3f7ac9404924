"""The diffusion interface every stage asks, for both families, on integer timesteps.

x_t = a_t * x0 + s_t * eps on integer timesteps t in [0, T) (T = 1000 for SD, SD3 and FLUX); t < 0 means "past the
last step" (the final coefficients: clean data). The stage modules, the consistency pair, the ReFL sampler and
the evaluators ask a `NoiseSchedule` for noising, the (x0, eps) a network output implies, the deterministic jump
t -> s, re-noising, the denoising target and the value the network is given as its time; none of them branches on
the family. Two families:

- "vp" (SD1.5, SDXL, the lab): a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t), the network predicts eps,
  and the jump is DDIM. The network is given t itself.
- "flow" (SD3, FLUX: rectified flow, diffusers' FlowMatchEulerDiscreteScheduler): a_t = 1 - sigma_t,
  s_t = sigma_t, the network predicts the velocity v = eps - x0, so x0 = x_t - sigma v and eps = x_t + (1 - sigma) v;
  the jump is Euler, x_s = x_t + (sigma_s - sigma_t) v, which is a_s x0 + s_s eps written out. Index t carries
  diffusers' training sigma of t + 1 (sigma_t = shift((t + 1) / T), so t = T - 1 is sigma = 1, pure noise), and the
  network is given T * sigma_t (diffusers' `timesteps`). The shift is static (SD3: 3.0) or dynamic (FLUX: mu
  from the image's token count, `flux_mu`), as diffusers applies it.

Both families share the integer grid, so TSCD's segments (Eq. 13), its t_end draws and the k-step trailing
timesteps are the same code for both; for flow, the k-step trailing indices are the sigmas
shift(1), shift((k-1)/k), ..., shift(1/k), which is exactly FLUX's pipeline default (`sigmas=linspace(1, 1/k, k)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FAMILIES = ("vp", "flow")


@dataclass(frozen=True)
class NoiseSchedule:
    table: Tensor  # [T] float64: alpha-bar_t (VP) or sigma_t (flow)
    final: float  # its value for t < 0: the scheduler's final alpha-bar (VP), sigma 0 (flow)
    family: str = "vp"
    T_model: int = 1000  # flow: the network is given T_model * sigma (diffusers' num_train_timesteps)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    # ---- construction ----
    @classmethod
    def vp(cls, alphas_cumprod: Tensor, final_alpha_cumprod: float) -> "NoiseSchedule":
        return cls(alphas_cumprod.double().clone(), float(final_alpha_cumprod), "vp")

    @classmethod
    def flow(cls, sigmas: Tensor, T_model: int | None = None) -> "NoiseSchedule":
        """From the training sigmas in ascending timestep order (sigmas[t] for t = 0 .. T-1)."""
        return cls(sigmas.double().clone(), 0.0, "flow", T_model or len(sigmas))

    @classmethod
    def from_scheduler(cls, scheduler, image_tokens: int | None = None) -> "NoiseSchedule":
        """Read the schedule from a diffusers scheduler: DDIM, TCD, LCM (VP: they share the alpha-bar config) or
        FlowMatchEulerDiscreteScheduler (flow). One that shifts by resolution (FLUX's) needs the packed latent's
        token count, from which mu follows as its pipeline computes it (`flux_mu` with the scheduler's config)."""
        if hasattr(scheduler, "alphas_cumprod"):
            return cls.vp(scheduler.alphas_cumprod, getattr(scheduler, "final_alpha_cumprod",
                                                            scheduler.alphas_cumprod[0]))
        c = scheduler.config
        unsupported = [k for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "invert_sigmas", "stochastic_sampling") if c.get(k)]
        if c.get("time_shift_type", "exponential") != "exponential":
            unsupported.append(f"time_shift_type={c.time_shift_type}")
        if unsupported:
            raise ValueError(f"flow-matching scheduler settings hsd does not model: {', '.join(unsupported)} (expected "
                             f"SD3's static or FLUX's dynamic shift)")
        mu = None
        if c.get("use_dynamic_shifting"):
            if image_tokens is None:
                raise ValueError("this flow-matching scheduler shifts by resolution: give the image's token count")
            mu = flux_mu(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return cls.flow(flow_sigmas(c.num_train_timesteps, c.get("shift", 1.0), mu), c.num_train_timesteps)

    # ---- the table ----
    @property
    def T(self) -> int:
        return self.table.numel()

    def lookup(self, t: Tensor) -> Tensor:
        """The table at integer timesteps t (any shape), float64; t < 0 gives the final value."""
        t = torch.as_tensor(t, dtype=torch.long)
        tab = self.table.to(t.device)
        return torch.where(t >= 0, tab[t.clamp(min=0)], torch.full_like(tab[:1], self.final)[0])

    def coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(a_t, s_t) shaped [B, 1, ..., 1] to broadcast against `like` [B, ...], in its dtype."""
        v = self.lookup(t).reshape(-1, *([1] * (like.dim() - 1)))
        if self.family == "vp":
            return v.sqrt().to(like), (1 - v).sqrt().to(like)
        return (1 - v).to(like), v.to(like)

    def model_time(self, t: Tensor) -> Tensor:
        """What the network is given as its time: t (VP), or T_model * sigma_t (flow, diffusers' timesteps)."""
        if self.family == "vp":
            return t
        return (self.T_model * self.lookup(t)).to(torch.float32)

    # ---- what the stages ask ----
    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t from (x0, eps) at timesteps t [B]."""
        return add_noise(x0, eps, *self.coeffs(t, x0))

    def split(self, x_t: Tensor, out: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by a network output at x_t, t: eps-prediction (VP) or velocity (flow)."""
        a, s = self.coeffs(t, x_t)
        if self.family == "vp":
            return eps_to_x0(x_t, out, a, s), out
        return x_t - s * out, x_t + a * out

    def x0(self, x_t: Tensor, out: Tensor, t: Tensor) -> Tensor:
        return self.split(x_t, out, t)[0]

    def jump(self, x_t: Tensor, out: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """The deterministic step t -> s (each [B]) with the network output at (x_t, t): a_s x0 + s_s eps. DDIM for
        VP, Euler x_t + (sigma_s - sigma_t) v for flow (the same point, written out); s < 0 lands on clean data."""
        x0, eps = self.split(x_t, out, t)
        a_s, s_s = self.coeffs(s, x_t)
        return a_s * x0 + s_s * eps

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        """What the network is regressed onto for a sample noised from (x0, eps): eps (VP) or v = eps - x0 (flow)."""
        return eps if self.family == "vp" else eps - x0

    def renoise(self, x: Tensor, t_from: Tensor, t_to: Tensor, noise: Tensor) -> Tensor:
        """A draw of q(x_to | x_from) for t_to >= t_from: r x + sqrt(s_to^2 - r^2 s_from^2) noise, r = a_to / a_from
        (for VP: sqrt(q) x + sqrt(1 - q) noise, q = alpha-bar_to / alpha-bar_from)."""
        shape = (-1, *([1] * (x.dim() - 1)))
        v_from, v_to = self.lookup(t_from), self.lookup(t_to)
        if self.family == "vp":
            q = (v_to / v_from).clamp(max=1).reshape(shape)
            return q.sqrt().to(x) * x + (1 - q).sqrt().to(x) * noise
        r = torch.where(v_from < 1, (1 - v_to) / (1 - v_from).clamp(min=1e-300), 0.0).clamp(max=1)  # from sigma 1: none
        std = (v_to * v_to - r * r * v_from * v_from).clamp(min=0).sqrt()
        return r.reshape(shape).to(x) * x + std.reshape(shape).to(x) * noise


# ---- the flow family's sigmas, as diffusers computes them (checked against it in tests/test_flow.py) ----
def static_shift(sigma: Tensor, shift: float) -> Tensor:
    """SD3's shift: shift sigma / (1 + (shift - 1) sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def dynamic_shift(sigma: Tensor, mu: float) -> Tensor:
    """FLUX's resolution-dependent (exponential) shift: e^mu / (e^mu + (1 / sigma - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def flux_mu(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """mu interpolated linearly in the packed latent's token count between (base_tokens, base_shift) and
    (max_tokens, max_shift): FLUX's defaults (its scheduler config), as its pipeline computes it."""
    m = (max_shift - base_shift) / (max_tokens - base_tokens)
    return image_tokens * m + base_shift - m * base_tokens


def trailing_sigmas(k: int) -> list[float]:
    """The k-step sampler's sigmas before the shift, linspace(1, 1/k, k): what a flow pipeline is given
    (`sigmas=`; FLUX's default), so that they are the trailing grid's points shift(1 - j / k) (ours, docs/flow.md)."""
    return [1 - j / k for j in range(k)]


def flow_sigmas(T: int = 1000, shift: float = 1.0, mu: float | None = None) -> Tensor:
    """Training sigmas in ascending timestep order: sigma_t = shift((t + 1) / T), t = 0 .. T-1 (float64)."""
    sigma = torch.arange(1, T + 1, dtype=torch.float64) / T
    return dynamic_shift(sigma, mu) if mu is not None else static_shift(sigma, shift)


# ---- VP helpers in (a, s) ----
def add_noise(x0: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return a * x0 + s * eps


def eps_to_x0(x_t: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return (x_t - s * eps) / a

