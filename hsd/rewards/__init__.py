"""Differentiable rewards for the feedback stage. The aesthetic and ImageReward scorers are the eval package's
(`eval.scorers`, `eval.imagereward`); the instance loss is here (`instance.py`, mmdet's SOLO)."""
