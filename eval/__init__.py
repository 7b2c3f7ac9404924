"""hsd's evaluation package.

Today it holds the lab world's exact metrics (alignment, fidelity, trajectory error, coverage) and the
paper-shaped table writer, re-exported from hsd.lab. The COCO-5k scorers (CLIP, LAION aesthetic,
ImageReward, PickScore) are issue 4 and not here yet.
"""
from hsd.lab.evaluate import LabEvaluator, write_table
from hsd.lab.world import metrics as lab_metrics

__all__ = ["LabEvaluator", "lab_metrics", "write_table"]
