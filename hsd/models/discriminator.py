"""The adversarial part of TSCD's distance for k = 2, 1 (SDXL-Lightning / PCM kind).

Features come from the frozen teacher on a re-noised sample: a UNet's encoder (down blocks + mid block) and, with
`up`, its decoder blocks too (PCM's discriminator reads the whole UNet); a transformer's (SD3, FLUX) image tokens
after every `stride`-th block to its last, laid back on their patch grid (at most `MAX_TOKEN_LEVELS` levels, so
FLUX's 57 blocks give 7 heads, not 57; ours). With `conditioned`, each head also sees the
features of the start point x_tn at t_n, so the discriminator judges the step x_tn -> sample rather than the sample
alone (SDXL-Lightning's D(x_t, x_{t-ns}, t, t-ns, c), which preserves the flow). Light trainable heads turn each
feature map into per-position logits. The UNet stays the teacher (its LoRA is switched off by the caller) and is
never a submodule here, so its weights belong to no optimizer of this module; gradient still flows through it to
the generator's sample.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .denoisers import denoiser_blocks, denoiser_out


class _Stop(Exception):
    """Raised after the last block whose features are read: the rest of the UNet is never run."""


MAX_TOKEN_LEVELS = 8  # a transformer's feature levels: every ceil(blocks / 8)-th block's output (ours)


def token_blocks(net) -> list:
    """The transformer blocks whose image tokens a discriminator reads: every stride-th of `denoiser_blocks`."""
    blocks = denoiser_blocks(net)
    stride = math.ceil(len(blocks) / MAX_TOKEN_LEVELS)
    return blocks[stride - 1::stride]


def denoiser_features(unet, x: Tensor, t: Tensor, cond: dict, up: bool = False, stop: bool = True) -> list[Tensor]:
    """Feature maps [B, C_i, H_i, W_i] of the denoiser at (x, t, cond): a UNet's down blocks, mid block and (with
    `up`) up blocks; a transformer's image tokens after each of `token_blocks` as a [B, D, H / p, W / p] grid (the
    blocks return (context tokens, image tokens); SD3's patches and FLUX's 2 x 2 packing are row-major).

    Hooks capture the features and (with stop) end the forward after the last block read, so the denoiser's own
    forward (time embedding, SDXL added conditions, FLUX's packing through `denoiser_out`) is used as is rather than
    re-implemented. Under FSDP every wrapped block must run, so there the rest runs too (stop=False) and its output
    is dropped.
    """
    feats: list[Tensor] = []
    tokens = hasattr(unet, "transformer_blocks")
    blocks = token_blocks(unet) if tokens else [*unet.down_blocks, unet.mid_block, *(unet.up_blocks if up else [])]
    H, W = x.shape[-2:]

    def keep(_, __, out):
        f = out[-1] if tokens else (out[0] if isinstance(out, tuple) else out)
        if tokens:  # [B, N, D] row-major patches -> [B, D, h, w]
            scale = math.isqrt(H * W // f.shape[1])
            f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], H // scale, W // scale)
        feats.append(f)

    def last(_, __, out):
        keep(_, __, out)
        if stop:
            raise _Stop

    handles = [b.register_forward_hook(keep) for b in blocks[:-1]] + [blocks[-1].register_forward_hook(last)]
    try:
        denoiser_out(unet, x, t, cond)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return feats


def feature_channels(unet, up: bool = False) -> list[int]:
    """Channels of `denoiser_features`: each down block's output, the mid block's, then each up block's; a transformer's
    width at each of `token_blocks`."""
    if hasattr(unet, "transformer_blocks"):
        c = unet.config
        return [c.num_attention_heads * c.attention_head_dim] * len(token_blocks(unet))
    ch = list(unet.config.block_out_channels)
    return ch + [ch[-1]] + (list(reversed(ch)) if up else [])


class Head(nn.Module):
    def __init__(self, channels: int, hidden: int, groups: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(min(groups, channels), channels), nn.SiLU(), nn.Conv2d(channels, hidden, 3, padding=1),
            nn.GroupNorm(min(groups, hidden), hidden), nn.SiLU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f)


class FeatureDiscriminator(nn.Module):
    """One head per feature level; returns a list of logit maps [B, 1, H_i, W_i]. `conditioned` heads take the
    sample's features and the start point's, concatenated along channels."""

    def __init__(self, channels: list[int], hidden: int = 64, conditioned: bool = False):
        super().__init__()
        self.conditioned = conditioned
        self.heads = nn.ModuleList(Head(c * (2 if conditioned else 1), hidden) for c in channels)

    def forward(self, feats: list[Tensor], start: list[Tensor] | None = None) -> list[Tensor]:
        if self.conditioned:
            if start is None:
                raise ValueError("a conditioned discriminator needs the start point's features")
            feats = [torch.cat([f, s.to(f)], 1) for f, s in zip(feats, start)]
        return [h(f.float()) for h, f in zip(self.heads, feats)]


def build_discriminator(unet, adv) -> FeatureDiscriminator:
    """The discriminator the settings `adv` (tscd.adv: hidden, up_features, conditioned) describe, for this UNet."""
    return FeatureDiscriminator(feature_channels(unet, adv.up_features), adv.hidden, adv.conditioned)
