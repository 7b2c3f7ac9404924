"""hsd: Hyper-SD training (work in progress)."""
