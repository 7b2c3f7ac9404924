"""The MLP head that Aes (the LAION aesthetic predictor) and ImageReward share."""
from __future__ import annotations

import torch
from torch import nn


class ScoreHead(nn.Module):
    """width -> 1024 -> 128 -> 64 -> 16 -> 1, linear throughout: the LAION aesthetic predictor's MLP, which
    ImageReward reuses. The dropouts (inactive in eval) keep the official key indices layers.{0,2,4,6,7}."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
