"""hsd's evaluation package: CLIP, Aes, ImageReward and PickScore on COCO-5k, generate -> score -> the paper's
table (`hsd eval`, `python -m eval`; docs/eval.md), and the lab world's exact metrics.

Names resolve lazily, so `hsd --help` (which builds the eval parser) never imports torch.
"""
from importlib import import_module

_EXPORTS = {
    "LabEvaluator": "hsd.lab.evaluate", "write_table": "hsd.lab.evaluate", "lab_metrics": "hsd.lab.world",
    "load_scorers": "eval.scorers", "score_batch": "eval.scorers", "METRICS": "eval.scorers",
    "ModelSpec": "eval.run", "run_eval": "eval.run", "coco5k": "eval.coco",
    "crop224": "eval.images", "resize_crop": "eval.images", "to_unit": "eval.images",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eval' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), "metrics" if name == "lab_metrics" else name)
