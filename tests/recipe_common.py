"""Helpers shared by tests/test_recipe_parts.py and tests/test_recipe_stages.py: the lab schedule, fake eps
functions that record their calls, and tiny consistency pairs."""
from types import SimpleNamespace

import torch

from hsd.config import load_config
from hsd.diffusion.schedule import NoiseSchedule
from hsd.lab.teacher import lab_scheduler
from hsd.lit.consistency import ConsistencyPair

SCHED = NoiseSchedule.from_scheduler(lab_scheduler())
B = 4


# ---- fakes ----
def _level(cond):
    """A per-sample number from the conditioning (tensor or SDXL dict), so CFG changes the fake eps."""
    if isinstance(cond, dict):
        return _level(cond["encoder_hidden_states"]) + _level(cond["added_cond_kwargs"]["text_embeds"])
    return cond.flatten(1).mean(1).reshape(-1, 1, 1, 1)


def _clone(cond):
    return {k: _clone(v) for k, v in cond.items()} if isinstance(cond, dict) else cond.detach().clone()


def _fake_eps(scale):
    def f(x, t, cond):
        return scale * x + _level(cond) + t.reshape(-1, 1, 1, 1).to(x) * 1e-4
    return f


class RecordingEps:
    """An eps function (x, t, cond) -> tensor that remembers every call."""

    def __init__(self, scale):
        self.fn, self.calls = _fake_eps(scale), []

    def __call__(self, x, t, cond):
        self.calls.append(SimpleNamespace(x=x.detach().clone(), t=t.clone(), cond=_clone(cond),
                                          grad=torch.is_grad_enabled()))
        return self.fn(x, t, cond)


def _tscd_cfg(*over):
    return load_config([], ["tscd.stages=[{k: 2, grid_steps: 8, iterations: 1}]", *over]).tscd


def _tensor_batch(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x0": torch.randn(n, 3, 8, 8, generator=g), "cond": torch.randn(n, 5, 16, generator=g),
            "uncond": torch.randn(1, 5, 16, generator=g).expand(n, -1, -1)}


def _pair(*over, guided=True, k=2, grid_steps=8):
    return ConsistencyPair(SCHED, k, grid_steps, _tscd_cfg(*over), guided=guided)


def _run_pair(pair, batch, seed=0):
    student, teacher, target = RecordingEps(0.3), RecordingEps(0.2), RecordingEps(0.1)
    out = pair(batch, torch.Generator().manual_seed(seed), student, teacher, target)
    return out, student, teacher, target
