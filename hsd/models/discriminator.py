"""The adversarial part of TSCD's distance for k = 2, 1 (SDXL-Lightning / PCM kind).

Features come from the frozen teacher UNet's encoder (down blocks + mid block) on a re-noised sample;
light trainable heads turn each feature map into per-position logits. The UNet stays the teacher (its
LoRA is switched off by the caller) and is never a submodule here, so its weights belong to no optimizer
of this module; gradient still flows through it to the generator's sample.
"""
from __future__ import annotations

from torch import Tensor, nn


class _Stop(Exception):
    """Raised after the mid block: the up-sampling half of the UNet is never run."""


def encoder_features(unet, x: Tensor, t: Tensor, cond: dict, stop: bool = True) -> list[Tensor]:
    """Outputs of every down block and of the mid block ([B, C_i, H_i, W_i] each) for UNet(x, t, **cond).

    Hooks capture the features and (with stop) end the forward after the mid block, so the UNet's own
    forward (time embedding, SDXL added conditions) is used as is rather than re-implemented. Under FSDP
    every wrapped block must run, so there the up blocks run too (stop=False) and their output is dropped.
    """
    feats: list[Tensor] = []

    def keep(_, __, out):
        feats.append(out[0] if isinstance(out, tuple) else out)

    def last(_, __, out):
        feats.append(out)
        if stop:
            raise _Stop

    handles = [b.register_forward_hook(keep) for b in unet.down_blocks]
    handles.append(unet.mid_block.register_forward_hook(last))
    try:
        unet(x, t, **cond)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return feats


def feature_channels(unet) -> list[int]:
    """Channels of `encoder_features`: each down block's output, then the mid block's."""
    ch = list(unet.config.block_out_channels)
    return ch + [ch[-1]]


class Head(nn.Module):
    def __init__(self, channels: int, hidden: int, groups: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(min(groups, channels), channels), nn.SiLU(), nn.Conv2d(channels, hidden, 3, padding=1),
            nn.GroupNorm(min(groups, hidden), hidden), nn.SiLU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f)


class FeatureDiscriminator(nn.Module):
    """One head per encoder feature level; returns a list of logit maps [B, 1, H_i, W_i]."""

    def __init__(self, channels: list[int], hidden: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(Head(c, hidden) for c in channels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [h(f.float()) for h, f in zip(self.heads, feats)]
