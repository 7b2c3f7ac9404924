"""Differentiable rewards for the feedback stage. The aesthetic and ImageReward scorers are hsd.scorers'
(the eval package scores with the same modules); the instance loss is here (`instance.py`, mmdet's SOLO)."""
