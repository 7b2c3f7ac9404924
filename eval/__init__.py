"""hsd's evaluation pipeline: generate over COCO-5k (or any prompts) -> score with CLIP, Aes, ImageReward and
PickScore -> the paper's table (`hsd eval`, `python -m eval`; docs/eval.md). The scorers themselves live in
`hsd.scorers`; the lab world's exact metrics in `hsd.lab`.

Names resolve lazily, so `hsd --help` (which builds the eval parser) never imports torch.
"""
from importlib import import_module

_EXPORTS = {
    "load_scorers": "hsd.scorers.scorers", "score_batch": "hsd.scorers.scorers", "METRICS": "hsd.scorers.scorers",
    "ModelSpec": "eval.run", "run_eval": "eval.run", "coco5k": "eval.coco",
    "crop224": "hsd.scorers.images", "resize_crop": "hsd.scorers.images", "to_unit": "hsd.scorers.images",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eval' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
