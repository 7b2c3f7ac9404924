"""Each world's own config rules, by world name (hsd.names.WORLDS): torch-free, so the schema's last check needs
no world module. `inputs=False` skips what names the run's input files (model.path, the data, the scorer and COCO
paths), for commands that read none of them (`hsd memory`)."""
from __future__ import annotations

from ..errors import ConfigError
from ..names import WORLDS
from .schema import Run

LAB_REWARDS = ("lab",)
SD_REWARDS = ("Aes", "ImageReward", "CLIP", "PickScore")


def check_world(run: Run, inputs: bool = True) -> None:
    if run.world not in WORLDS:
        raise ConfigError(f"world must be one of {', '.join(WORLDS)}, got {run.world!r}")
    RULES[WORLDS[run.world]](run, inputs)


def _rewards(run: Run, known: tuple[str, ...]) -> None:
    unknown = sorted(set(run.feedback.rewards) - set(known))
    if unknown:
        raise ConfigError(f"feedback.rewards: unknown reward(s) {unknown} for world {run.world!r}; known: "
                          f"{', '.join(known)}")


def lab_rules(run: Run, inputs: bool = True) -> None:
    f = run.feedback
    _rewards(run, LAB_REWARDS)
    if f.instance_weight and (f.iterations or run.dmd.w_feedback):
        raise ConfigError("feedback.instance_weight: the instance loss needs COCO and SOLO (SD worlds only)")


def sd_rules(run: Run, inputs: bool = True) -> None:
    f = run.feedback
    _rewards(run, SD_REWARDS)
    if run.model.t5 and run.world != "sd3":
        raise ConfigError(f"model.t5: SD3's optional T5 encoder; world {run.world!r} has none to add "
                          f"{'(FLUX always reads its T5)' if run.world == 'flux' else ''}".rstrip())
    if not inputs:
        return
    if f.iterations or run.dmd.w_feedback:
        if f.rewards and not f.scorers:
            raise ConfigError("feedback.rewards needs feedback.scorers: the scorer weights folder (docs/eval.md)")
        missing = [k for k in ("solo", "coco_annotations", "coco_images", "coco_captions") if not getattr(f, k)]
        if f.instance_weight and missing:
            raise ConfigError(f"feedback.instance_weight > 0 needs feedback.{', feedback.'.join(missing)}")
    if not run.model.path:
        raise ConfigError(f"world {run.world!r} needs model.path: a local diffusers folder or .safetensors file")
    if sum(map(bool, (run.data.shards, run.data.folder, run.data.cache))) != 1:
        raise ConfigError("set exactly one of data.shards (webdataset), data.folder (images + .txt) and data.cache "
                          "(a folder `hsd cache` wrote from one of those)")


RULES = {"lab": lab_rules, "sd": sd_rules}
