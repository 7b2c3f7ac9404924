"""The differentiable scorers CLIP, Aes, ImageReward, PickScore, the shared 224 crop and normalisation; the
feedback rewards and the eval pipeline both sit on it; imports nothing of training.

Modules: `scorers` (the four scorers, their loaders, `load_scorers`, `score_batch`), `heads` (the MLP head Aes
and ImageReward share), `clip` (OpenAI CLIP through open_clip), `imagereward` (+ `imagereward_weights`),
`images` (the 224 crop, [0, 1] checks, normalisation, the differentiable `resize_crop`), `random_weights`
(random-weight scorer files in the official layouts). Only `hsd.io` and `hsd.errors` of hsd are imported here.
"""
from hsd.errors import HsdError


class ScorerWeightsError(HsdError, ValueError):
    """A scorer weights file or folder that is not the checkpoint its metric expects (wrong keys or shapes)."""
