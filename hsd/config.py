"""Structured configs: dataclasses hold every default; YAML files and key=value overrides change them.

An experiment YAML may name a `base:` YAML (relative to itself) whose overrides it extends. Unknown keys
are refused with the nearest known key suggested; the resolved config is saved in the run folder.
"""
from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .models.lora import DEFAULT_TARGETS

WORLDS = ("lab", "sd15", "sdxl")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Stage:
    k: int = 8                 # number of trajectory segments
    grid_steps: int = 32       # N: the teacher's DDIM grid the student is distilled on
    iterations: int = 300
    w_mse: float = 1.0
    w_adv: float = 0.0


@dataclass
class Lora:
    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


@dataclass
class Adversarial:
    """The discriminator used where a stage's w_adv > 0 (frozen teacher-encoder features + light heads)."""
    loss: str = "hinge"        # hinge | ns (non-saturating)
    lr: float = 1e-4
    hidden: int = 64           # channels of each head
    renoise_max: float = 0.5   # both samples are re-noised from t_end to t' ~ U[t_end, renoise_max * T]


@dataclass
class TSCD:
    stages: list[Stage] = field(default_factory=lambda: [Stage(8, 32, 200), Stage(4, 32, 200),
                                                         Stage(2, 32, 250), Stage(1, 32, 350)])
    iteration_scale: float = 1.0  # multiplies every stage's iterations (quick ablations at equal budgets)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.95
    guidance_min: float = 2.5  # w = 1 + omega ~ U[guidance_min, guidance_max] (Eq. 3)
    guidance_max: float = 3.5
    loss: str = "mse"          # mse | huber
    huber_c: float = 0.001
    offset_noise: float = 0.0  # noise perturbation: eps += offset_noise * N(0, 1) per sample and channel
    t_end: str = "uniform"     # uniform: t_end ~ U[t_b, t_prev] (TSCD); boundary: t_end = t_b (CD when k = 1)
    accumulate: int = 1        # micro-batches per optimizer step (effective batch = batch_size * accumulate * GPUs)
    grad_clip: float = 0.0     # max gradient norm of the LoRA (0: off)
    optimizer: str = "adamw"   # adamw | adamw8bit (bitsandbytes)
    adv: Adversarial = field(default_factory=Adversarial)


@dataclass
class Reward:
    margin: float = 1.0        # alpha_d of Eq. 15: no gradient once the reward clears it
    weight: float = 1.0


@dataclass
class Feedback:
    """Human-feedback stage (§3.2): its own LoRA, trained on top of the (frozen) TSCD LoRA. 0 iterations: off."""
    iterations: int = 0
    batch_size: int = 16
    lr: float = 1e-4
    grad_clip: float = 1.0
    steps: int = 4             # the student's DDIM-trailing schedule that x_T is denoised along (no gradient)...
    t_range: list[int] = field(default_factory=lambda: [0, 999])  # ...to a grid step t in [t_left, t_right],
    #                            then one step with gradient predicts x'_0
    rewards: dict[str, Reward] = field(default_factory=dict)  # Aes | ImageReward | CLIP | PickScore (SD), lab
    scorers: str = ""          # scorer weights folder (docs/eval.md layout) for the SD rewards
    instance_weight: float = 0.0  # weight of Eq. 16's SOLO instance loss (0: off; SD worlds only)
    solo: str = ""             # SOLO R50-FPN checkpoint (mmdet .pth or .safetensors)
    solo_classes: int = 80
    coco_annotations: str = ""  # instances_train2017.json
    coco_images: str = ""      # the train2017 image folder
    merge_weights: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5])  # report: TSCD + w * feedback


@dataclass
class DMD:
    """One-step enhancement (§3.3): distribution matching with a fake score network. 0 iterations: off."""
    iterations: int = 0
    batch_size: int = 16
    lr: float = 1e-4           # generator
    fake_lr: float = 1e-4
    grad_clip: float = 1.0
    generator: str = "lora"    # lora: keep training the TSCD LoRA (the unified LoRA) | full: fine-tune the UNet
    timestep: int = 999        # the generator's timestep input: 999 unified LoRA (TCD), 800 one-step UNet (LCM)
    fake: str = "lora"         # the fake score: a LoRA of its own on the teacher | full: a trainable UNet copy
    fake_updates: int = 1      # fake-score updates per generator update (DMD2 uses 5)
    guidance: float = 3.0      # CFG of the real score (the frozen teacher)
    t_min: float = 0.02        # DMD's noise levels t ~ U[t_min, t_max] * T (DMD2's range)
    t_max: float = 0.98
    w_mse: float = 0.0         # lambda_mse: MSE to the teacher's multi-step result from the same noise
    mse_steps: int = 25        # the teacher's DDIM steps (CFG = guidance) for that target
    w_feedback: float = 0.0    # weight of the feedback losses (feedback.rewards and the instance loss)


@dataclass
class Lab:
    teacher: str = ""          # diffusers folder of the fitted lab teacher; "" = the one shipped in hsd/lab
    eval_per_class: int = 64
    eval_guidance: float = 3.0
    teacher_steps: int = 25
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    tcd_eta: float = 0.3


@dataclass
class Model:
    """SD1.5 / SDXL weights (world: sd15 | sdxl), all from local files."""
    path: str = ""             # diffusers folder (model_index.json) or a single-file .safetensors
    config: str = ""           # for a single file: a diffusers folder with the configs and tokenizers
    vae: str = ""              # optional replacement VAE folder (e.g. an fp16-fixed SDXL VAE)
    vae_dtype: str = "float32"  # the SDXL VAE overflows in half precision: keep float32 unless fixed
    frozen_dtype: str = "float32"  # dtype of the frozen UNet/text weights (bfloat16 halves their memory)
    lora_init: str = ""        # start from this LoRA file (e.g. a released Hyper-SD LoRA) instead of zeros
    gradient_checkpointing: bool = False
    resolution: int = 512


@dataclass
class Data:
    shards: str = ""           # webdataset shards: paths, brace patterns, pipe: URLs
    folder: str = ""           # or a folder of images with same-stem .txt captions
    crop: str = "random"       # random | center
    flip: bool = False
    num_workers: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red car on a city street"])


@dataclass
class Trainer:
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"     # auto | ddp | fsdp
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true | 16-mixed
    log_every: int = 25
    ckpt_every: int = 100
    progress_bar: bool = True


@dataclass
class Run:
    name: str = "lab_tscd"
    out_dir: str = "runs"
    seed: int = 0
    world: str = "lab"
    lora: Lora = field(default_factory=Lora)
    tscd: TSCD = field(default_factory=TSCD)
    feedback: Feedback = field(default_factory=Feedback)
    dmd: DMD = field(default_factory=DMD)
    lab: Lab = field(default_factory=Lab)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    trainer: Trainer = field(default_factory=Trainer)


def load_config(paths: list[str] = (), overrides: list[str] = ()) -> Run:
    """Defaults <- each YAML (after its `base:` chain) <- key=value overrides; returns a typed Run."""
    cfg = OmegaConf.structured(Run)
    for p in paths:
        for layer in _yaml_chain(Path(p)):
            _check(Run, layer, str(p))
            cfg = OmegaConf.merge(cfg, layer)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. tscd.lr=1e-4)")
        key, value = item.split("=", 1)
        _check_path(Run, key.split("."), key)
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=True)
        except OmegaConfBaseException as e:  # e.g. a wrong type, or a new dict entry set key by key
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]} (set a new mapping entry whole, e.g. "
                              f"feedback.rewards={{Aes: {{margin: 7, weight: 1}}}})") from e
    run = OmegaConf.to_object(cfg)
    _validate(run)
    return run


def save_config(run: Run, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))


def _yaml_chain(path: Path) -> list[dict]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    return (_yaml_chain(path.parent / base) if base else []) + [data]


def _unknown(key: str, known: list[str], prefix: str, where: str) -> ConfigError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{prefix}{key}' in {where}{hint}")


def _check(cls, data: dict, where: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints:
            raise _unknown(key, [f.name for f in fields(cls)], prefix, where)
        t = hints[key]
        if is_dataclass(t) and isinstance(value, dict):
            _check(t, value, where, f"{prefix}{key}.")
        elif typing.get_origin(t) is list and is_dataclass(typing.get_args(t)[0]) and isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ConfigError(f"{where}: '{prefix}{key}.{i}' must be a mapping")
                _check(typing.get_args(t)[0], item, where, f"{prefix}{key}.{i}.")


def _check_path(cls, parts: list[str], where: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    if parts[0] not in hints:
        raise _unknown(parts[0], [f.name for f in fields(cls)], prefix, f"override '{where}'")
    t, rest = hints[parts[0]], parts[1:]
    if rest and typing.get_origin(t) is list and rest[0].isdigit():
        t, rest, prefix = typing.get_args(t)[0], rest[1:], f"{prefix}{parts[0]}.{rest[0]}."
    else:
        prefix = f"{prefix}{parts[0]}."
    if rest and is_dataclass(t):
        _check_path(t, rest, where, prefix)


def _validate(run: Run) -> None:
    t = run.tscd
    if t.loss not in ("mse", "huber"):
        raise ConfigError(f"tscd.loss must be 'mse' or 'huber', got {t.loss!r}")
    if t.t_end not in ("uniform", "boundary"):
        raise ConfigError(f"tscd.t_end must be 'uniform' or 'boundary', got {t.t_end!r}")
    if not t.stages and not (run.feedback.iterations or run.dmd.iterations):
        raise ConfigError("tscd.stages is empty and feedback.iterations = dmd.iterations = 0: nothing to train")
    if not t.guidance_min <= t.guidance_max:
        raise ConfigError("tscd.guidance_min must not exceed tscd.guidance_max")
    if run.world not in WORLDS:
        raise ConfigError(f"world must be one of {', '.join(WORLDS)}, got {run.world!r}")
    if t.adv.loss not in ("hinge", "ns"):
        raise ConfigError(f"tscd.adv.loss must be 'hinge' or 'ns', got {t.adv.loss!r}")
    if t.optimizer not in ("adamw", "adamw8bit"):
        raise ConfigError(f"tscd.optimizer must be 'adamw' or 'adamw8bit', got {t.optimizer!r}")
    if t.accumulate < 1:
        raise ConfigError("tscd.accumulate must be >= 1")
    if run.trainer.strategy not in ("auto", "ddp", "fsdp"):
        raise ConfigError(f"trainer.strategy must be auto, ddp or fsdp, got {run.trainer.strategy!r}")
    for key in ("vae_dtype", "frozen_dtype"):
        if getattr(run.model, key) not in DTYPES:
            raise ConfigError(f"model.{key} must be one of {', '.join(DTYPES)}, got {getattr(run.model, key)!r}")
    if run.model.frozen_dtype != "float32" and "mixed" not in run.trainer.precision:
        raise ConfigError(f"model.frozen_dtype={run.model.frozen_dtype} needs autocast: set trainer.precision to "
                          f"bf16-mixed or 16-mixed (got {run.trainer.precision!r})")
    _validate_feedback(run)
    _validate_dmd(run.dmd)
    if run.world != "lab":
        if not run.model.path:
            raise ConfigError(f"world {run.world!r} needs model.path: a local diffusers folder or .safetensors file")
        if bool(run.data.shards) == bool(run.data.folder):
            raise ConfigError("set exactly one of data.shards (webdataset) and data.folder (images + .txt)")


LAB_REWARDS = ("lab",)
SD_REWARDS = ("Aes", "ImageReward", "CLIP", "PickScore")


def _validate_feedback(run: Run) -> None:
    f, lab = run.feedback, run.world == "lab"
    known = LAB_REWARDS if lab else SD_REWARDS
    unknown = sorted(set(f.rewards) - set(known))
    if unknown:
        raise ConfigError(f"feedback.rewards: unknown reward(s) {unknown} for world {run.world!r}; known: "
                          f"{', '.join(known)}")
    if len(f.t_range) != 2 or not 0 <= f.t_range[0] <= f.t_range[1]:
        raise ConfigError(f"feedback.t_range must be [t_left, t_right] with 0 <= t_left <= t_right, got {f.t_range}")
    if not (f.iterations or run.dmd.w_feedback):
        return
    if not lab and f.rewards and not f.scorers:
        raise ConfigError("feedback.rewards needs feedback.scorers: the scorer weights folder (docs/eval.md)")
    if f.instance_weight:
        if lab:
            raise ConfigError("feedback.instance_weight: the instance loss needs COCO and SOLO (SD worlds only)")
        missing = [k for k in ("solo", "coco_annotations", "coco_images") if not getattr(f, k)]
        if missing:
            raise ConfigError(f"feedback.instance_weight > 0 needs feedback.{', feedback.'.join(missing)}")
    if f.iterations and not f.rewards and not f.instance_weight:
        raise ConfigError("feedback.iterations > 0 but no feedback.rewards and feedback.instance_weight = 0")


def _validate_dmd(d: DMD) -> None:
    if d.generator not in ("lora", "full") or d.fake not in ("lora", "full"):
        raise ConfigError(f"dmd.generator and dmd.fake must be 'lora' or 'full', got {d.generator!r}, {d.fake!r}")
    if not 0 <= d.t_min < d.t_max <= 1:
        raise ConfigError(f"dmd.t_min < dmd.t_max must lie in [0, 1], got {d.t_min}, {d.t_max}")
    if d.fake_updates < 1:
        raise ConfigError("dmd.fake_updates must be >= 1")
