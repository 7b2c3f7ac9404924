"""Rules that tie fields together, then the named world's own rules (hsd.config.worlds)."""
from __future__ import annotations

from ..diffusion.grid import off_grid
from ..errors import ConfigError
from .rules import FieldError, check_fields
from .schema import DMD, Run, T
from .worlds import check_world


def validate(run: Run, inputs: bool = True) -> None:
    """inputs=False: every rule but those naming the world's input files (model.path, the data)."""
    check_fields(run)
    t = run.tscd
    if not t.stages and not (run.feedback.iterations or run.dmd.iterations):
        raise ConfigError("tscd.stages is empty and feedback.iterations = dmd.iterations = 0: nothing to train")
    for i, s in enumerate(t.stages):
        if s.grid_steps < s.k:
            key = f"tscd.stages.{i}.grid_steps"
            raise FieldError(key, f"{key} must be >= tscd.stages.{i}.k = {s.k} (each segment needs a teacher step), "
                                  f"got {s.grid_steps}")
        missed = off_grid(T, s.k, s.grid_steps)
        if missed and not t.allow_misaligned_grid:
            key = f"tscd.stages.{i}.grid_steps"
            raise FieldError(key, f"{key}={s.grid_steps} is not a multiple of k={s.k}: the {s.k}-step sampler's "
                                  f"timesteps {', '.join(map(str, missed))} are not points of the training grid; "
                                  f"use a multiple of every k (48 or 64 serve k = 8, 4, 2, 1), or set "
                                  f"tscd.allow_misaligned_grid=true to train it anyway")
    if not t.guidance_min <= t.guidance_max:
        raise FieldError("tscd.guidance_min", f"tscd.guidance_min must not exceed tscd.guidance_max, got "
                                              f"{t.guidance_min:g} > {t.guidance_max:g}")
    if run.model.frozen_dtype != "float32" and "mixed" not in run.trainer.precision:
        raise ConfigError(f"model.frozen_dtype={run.model.frozen_dtype} needs autocast: set trainer.precision to "
                          f"bf16-mixed or 16-mixed (got {run.trainer.precision!r})")
    if run.trainer.strategy == "fsdp" and run.trainer.precision in ("16-mixed", "16"):
        raise ConfigError("trainer.precision=16-mixed with trainer.strategy=fsdp: under FSDP hsd clips gradients "
                          "itself, before fp16's loss scaler would unscale them; use bf16-mixed")
    ranks = run.trainer.devices * run.trainer.num_nodes
    if run.model.quantize != "none" and (run.trainer.strategy != "auto" or ranks > 1):
        raise ConfigError(f"model.quantize={run.model.quantize} is for one process (one GPU): hsd neither shards nor "
                          f"replicates a quantized base (trainer.strategy={run.trainer.strategy}, {ranks} rank(s)); "
                          f"set trainer.strategy=auto trainer.devices=1, or model.quantize=none to use FSDP")
    if run.dmd.iterations and run.dmd.w_consistency and not t.stages:
        raise ConfigError("dmd.w_consistency > 0 keeps the last TSCD stage's loss, but tscd.stages is empty")
    _validate_feedback(run)
    _validate_dmd(run.dmd)
    check_world(run, inputs)


def _validate_feedback(run: Run) -> None:
    """The rules of any world; which rewards and which instance loss a world has, the world checks."""
    f = run.feedback
    if len(f.t_range) != 2 or not 0 <= f.t_range[0] <= f.t_range[1] < T:
        raise ConfigError(f"feedback.t_range must be [t_left, t_right] with 0 <= t_left <= t_right < {T}, "
                          f"got {f.t_range}")
    if f.iterations and not f.rewards and not f.instance_weight:
        raise ConfigError("feedback.iterations > 0 but no feedback.rewards and feedback.instance_weight = 0")


def _validate_dmd(d: DMD) -> None:
    if d.generator not in ("lora", "full") or d.fake not in ("lora", "full"):
        raise ConfigError(f"dmd.generator and dmd.fake must be 'lora' or 'full', got {d.generator!r}, {d.fake!r}")
    if not 0 <= d.t_min < d.t_max <= 1:
        raise ConfigError(f"dmd.t_min < dmd.t_max must lie in [0, 1], got {d.t_min}, {d.t_max}")
