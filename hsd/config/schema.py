"""The config schema: dataclasses hold every default and, in their metadata, every value's allowed range."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..models.targets import DEFAULT_TARGETS
from ..names import DEFAULT_LAB_WORLD, LAB_WORLDS, QUANTIZE_MODES
from .rules import ge, gt, nonempty, one_of, within

DTYPES = ("float32", "bfloat16", "float16")
LOGGERS = ("tensorboard", "csv", "wandb")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64")  # Lightning's (the last four: legacy aliases)
T = 1000  # training timesteps of every world's noise schedule (the lab's and SD1.5/SDXL's)
SEED_MAX = (2 ** 32 - 1) // 100 - 100  # stages seed with seed * 100 + i: it must stay a 32-bit seed



# Guidance scales are w of eps_u + w (eps_c - eps_u): 1 is the conditional model alone (no CFG), 0 the
# unconditional one; both are valid choices, only w < 0 (steering away from the prompt) is refused.

@dataclass
class Stage:
    k: int = field(default=8, metadata=within(1, T))            # number of trajectory segments
    grid_steps: int = field(default=32, metadata=within(1, T))  # N: the teacher's DDIM grid the student is
    #                                                             distilled on (>= k: each segment needs a step)
    iterations: int = field(default=300, metadata=ge(1))
    w_mse: float = field(default=1.0, metadata=ge(0))
    w_adv: float = field(default=0.0, metadata=ge(0))


@dataclass
class Lora:
    rank: int = field(default=16, metadata=ge(1))
    alpha: float = field(default=16.0, metadata=gt(0))
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # [] = these defaults


@dataclass
class Adversarial:
    """The discriminator used where a stage's w_adv > 0 (frozen teacher-encoder features + light heads)."""
    loss: str = field(default="hinge", metadata=one_of("hinge", "ns"))  # ns: non-saturating
    lr: float = field(default=1e-4, metadata=gt(0))
    hidden: int = field(default=64, metadata=ge(1))             # channels of each head
    renoise_max: float = field(default=0.5, metadata=within(0, 1))  # both samples are re-noised from t_end to
    #                                                             t' ~ U[t_end, renoise_max * T], each its own noise
    up_features: bool = True    # heads on the up blocks too, not only down + mid (PCM reads the whole UNet)
    conditioned: bool = True    # heads also see the start point x_tn's features (SDXL-Lightning's D(x_t, x_t', ...))


@dataclass
class TSCD:
    stages: list[Stage] = field(default_factory=lambda: [Stage(8, 32, 200), Stage(4, 32, 200),
                                                         Stage(2, 32, 250), Stage(1, 32, 350)])
    iteration_scale: float = field(default=1.0, metadata=gt(0))  # multiplies every stage's iterations (quick
    #                                                              ablations at equal budgets)
    batch_size: int = field(default=64, metadata=ge(1))
    lr: float = field(default=1e-3, metadata=gt(0))
    weight_decay: float = field(default=0.0, metadata=ge(0))
    ema_decay: float = field(default=0.95, metadata=within(0, 1, hi_open=True))
    guidance_min: float = field(default=2.5, metadata=ge(0))  # w = 1 + omega ~ U[guidance_min, guidance_max]
    guidance_max: float = field(default=3.5, metadata=ge(0))  # (Eq. 3)
    loss: str = field(default="mse", metadata=one_of("mse", "huber"))
    huber_c: float = field(default=0.001, metadata=gt(0))
    offset_noise: float = field(default=0.0, metadata=ge(0))  # noise perturbation: eps += offset_noise * N(0, 1)
    #                                                          per sample and channel
    # uniform: t_end ~ U[t_b, t_prev] (TSCD); boundary: t_end = t_b (CD when k = 1)
    t_end: str = field(default="uniform", metadata=one_of("uniform", "boundary"))
    accumulate: int = field(default=1, metadata=ge(1))  # micro-batches per optimizer step (effective batch =
    #                                                     batch_size * accumulate * GPUs)
    grad_clip: float = field(default=0.0, metadata=ge(0))  # max gradient norm of the LoRA (0: off)
    optimizer: str = field(default="adamw", metadata=one_of("adamw", "adamw8bit"))  # adamw8bit: bitsandbytes
    cfg_solver: bool = True    # the teacher's step applies CFG (Eq. 3). false: the conditional teacher alone, so
    #                            the LoRA keeps CFG usable at inference (PCM's --not_apply_cfg_solver; CFG LoRAs)
    empty_prompts: float = field(default=0.0, metadata=within(0, 1))  # fraction of samples trained on the empty
    #                            prompt (PCM's --proportion_empty_prompts 0.15 with the CFG-preserving recipe)
    teacher: str = field(default="base", metadata=one_of("base", "previous"))  # whose step stage i > 0 distils:
    #                            the base model with CFG (Alg. 1), or stage i-1's LoRA (no CFG: it is folded in)
    allow_misaligned_grid: bool = False  # train a stage whose k-step sampler queries timesteps off its grid
    #                                     (grid_steps not a multiple of k): refused unless set, for ablations
    adv: Adversarial = field(default_factory=Adversarial)


@dataclass
class Reward:
    margin: float = 1.0        # alpha_d of Eq. 15: no gradient once the reward clears it (rewards may be < 0)
    weight: float = field(default=1.0, metadata=ge(0))


@dataclass
class Feedback:
    """Human-feedback stage (§3.2): its own LoRA, trained on top of the (frozen) TSCD LoRA. 0 iterations: off."""
    iterations: int = field(default=0, metadata=ge(0))
    batch_size: int = field(default=16, metadata=ge(1))
    lr: float = field(default=1e-4, metadata=gt(0))
    grad_clip: float = field(default=1.0, metadata=ge(0))
    steps: int = field(default=4, metadata=within(1, T))  # the student's DDIM-trailing schedule that x_T is
    #                                                        denoised along (no gradient)...
    t_range: list[int] = field(default_factory=lambda: [0, 999], metadata=within(0, T, hi_open=True))  # ...to a
    #                            grid step t in [t_left, t_right], then one step with gradient predicts x'_0
    rewards: dict[str, Reward] = field(default_factory=dict)  # Aes | ImageReward | CLIP | PickScore (SD), lab
    scorers: str = ""          # scorer weights folder (docs/eval.md layout) for the SD rewards
    instance_weight: float = field(default=0.0, metadata=ge(0))  # weight of Eq. 16's SOLO instance loss (0: off;
    #                                                               SD worlds only)
    solo: str = ""             # SOLO R50-FPN checkpoint (mmdet .pth or .safetensors)
    solo_classes: int = field(default=80, metadata=ge(1))
    coco_annotations: str = ""  # instances_train2017.json
    coco_images: str = ""      # the train2017 image folder
    coco_captions: str = ""    # captions_train2017.json: each image's denoising is conditioned on one of its captions
    instance_start: int = field(default=499, metadata=within(0, T, hi_open=True))  # t_a of Eq. 16: COCO images are
    #                            diffused to the ReFL grid step at or below it, then denoised to a stop in t_range
    #                            (ours: 499, SDEdit's strength 0.5, keeps the layout the ground-truth masks describe)
    merge_weights: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5])  # report: TSCD + w * feedback
    #                            (any w: a negative one, extrapolating away from the feedback LoRA, is a valid probe)


@dataclass
class DMD:
    """One-step enhancement (§3.3): distribution matching with a fake score network. 0 iterations: off."""
    iterations: int = field(default=0, metadata=ge(0))
    batch_size: int = field(default=16, metadata=ge(1))
    lr: float = field(default=1e-4, metadata=gt(0))       # generator
    fake_lr: float = field(default=1e-4, metadata=gt(0))
    grad_clip: float = field(default=1.0, metadata=ge(0))
    generator: str = "lora"    # lora: keep training the TSCD LoRA (the unified LoRA) | full: fine-tune the UNet
    timestep: int = field(default=999, metadata=within(0, T, hi_open=True))  # the generator's timestep input:
    #                            999 unified LoRA (TCD), 800 one-step UNet (LCM)
    fake: str = "lora"         # the fake score: a LoRA of its own on the teacher | full: a trainable UNet copy
    fake_updates: int = field(default=1, metadata=ge(1))  # fake-score updates per generator update (DMD2 uses 5)
    guidance: float = field(default=3.0, metadata=ge(0))  # CFG of the real score (the frozen teacher; 1: none)
    t_min: float = 0.02        # DMD's noise levels t ~ U[t_min, t_max] * T (DMD2's range)
    t_max: float = 0.98
    w_mse: float = field(default=0.0, metadata=ge(0))   # lambda_mse: MSE to the teacher's multi-step result from
    #                                                      the same noise
    mse_steps: int = field(default=25, metadata=within(1, T))  # the teacher's DDIM steps (CFG = guidance) for it
    w_feedback: float = field(default=0.0, metadata=ge(0))  # weight of the feedback losses (feedback.rewards and
    #                                                          the instance loss)
    w_consistency: float = field(default=0.0, metadata=ge(0))  # the last TSCD stage's consistency loss kept in the
    #                            DMD stage (LoRA generator), so the unified LoRA stays consistent at 2-8 steps


@dataclass
class Lab:
    world: str = field(default=DEFAULT_LAB_WORLD, metadata=one_of(*LAB_WORLDS))  # the shipped world and its fitted
    #                            teacher: digits (headroom, the default) | blocks (the fast smoke world) | digits-flow
    #                            (digits under rectified flow, a transformer teacher: docs/flow.md)
    teacher: str = ""          # or a fitted teacher folder (`hsd lab-teacher --out`; it carries its own world)
    eval_per_class: int = field(default=32, metadata=ge(2))  # samples per class in the table (2: the 3-NN recall)
    eval_guidance: float = field(default=3.0, metadata=ge(0))
    teacher_steps: int = field(default=25, metadata=within(1, T))
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata=within(1, T))
    tcd_eta: float = field(default=0.3, metadata=within(0, 1))
    # the evaluation set's seed (noise, exact sets, directions: hsd.lab.evaluate.eval_seeds); -1: the run's seed, so
    # the spread over seeds includes the evaluation draw and arms with one seed are paired (ours, issue 22)
    eval_seed: int = field(default=-1, metadata=ge(-1))


@dataclass
class Model:
    """The weights of the SD worlds (world: sd15 | sdxl | sd3 | flux), all from local files, and how the frozen base
    is held (every world)."""
    path: str = ""             # diffusers folder (model_index.json) or a single-file .safetensors
    config: str = ""           # for a single file: a diffusers folder with the configs and tokenizers
    vae: str = ""              # optional replacement VAE folder (e.g. an fp16-fixed SDXL VAE)
    # the SDXL VAE overflows in half precision: keep float32 unless fixed
    vae_dtype: str = field(default="float32", metadata=one_of(*DTYPES))
    # dtype of the frozen UNet/text weights (bfloat16 halves their memory)
    frozen_dtype: str = field(default="float32", metadata=one_of(*DTYPES))
    lora_init: str = ""        # start from this LoRA file (e.g. a released Hyper-SD LoRA) instead of zeros
    # the frozen denoiser's Linear weights under the LoRA, weight-only (torchao; every world, the lab's included):
    # none | int8 | fp8 | nf4. The teacher is that same quantized base with the adapters off (QLoRA's idea; ours,
    # issue 23: no peer quantizes a distillation teacher). One process only; verdict and memory: docs/memory.md
    quantize: str = field(default="none", metadata=one_of(*QUANTIZE_MODES))
    gradient_checkpointing: bool = False
    resolution: int = field(default=512, metadata=ge(1))
    # SD3: also load the folder's T5-XXL (text_encoder_3) and condition on it, as its pipeline does when the folder
    # has one; off: the pipeline's text_encoder_3=None path (zeros in T5's place). FLUX always reads its T5.
    t5: bool = False


@dataclass
class Data:
    shards: str = ""           # webdataset shards: paths, brace patterns, pipe: URLs
    folder: str = ""           # or a folder of images with same-stem .txt captions
    cache: str = ""            # or a cache folder `hsd cache` wrote from those (latents + text conditioning): the run
    #                            loads no text encoder and no VAE to train (docs/memory.md)
    # a sample without a caption: error (named before any weights load where it is among the first) | empty (trained
    # on the empty prompt, counted as data/uncaptioned). ours: silent unconditional training is never the default
    missing_captions: str = field(default="error", metadata=one_of("error", "empty"))
    crop: str = field(default="random", metadata=one_of("random", "center"))
    flip: bool = False
    num_workers: int = field(default=0, metadata=ge(0))
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red car on a city street"])


@dataclass
class Trainer:
    accelerator: str = "cpu"
    devices: int = field(default=1, metadata=ge(1))
    num_nodes: int = field(default=1, metadata=ge(1))
    strategy: str = field(default="auto", metadata=one_of("auto", "ddp", "fsdp"))
    precision: str = field(default="32-true", metadata=one_of(*PRECISIONS))  # 32-true | bf16-mixed | bf16-true |
    #                                                                          16-mixed
    log_every: int = field(default=25, metadata=ge(1))
    # log grad/<term>, each loss term's gradient norm over the trained tensors, every N batches (0: off; one extra
    # backward per term on those batches; single-process runs). ours: issue 22, weights judged by gradient
    grad_norms_every: int = field(default=10, metadata=ge(0))
    ckpt_every: int = field(default=100, metadata=ge(1))
    progress_bar: bool = True
    logger: str = field(default="tensorboard", metadata=one_of(*LOGGERS))


@dataclass
class Run:
    name: str = field(default="lab_tscd", metadata=nonempty())
    out_dir: str = "runs"
    seed: int = field(default=0, metadata=within(0, SEED_MAX))
    world: str = "lab"
    lora: Lora = field(default_factory=Lora)
    tscd: TSCD = field(default_factory=TSCD)
    feedback: Feedback = field(default_factory=Feedback)
    dmd: DMD = field(default_factory=DMD)
    lab: Lab = field(default_factory=Lab)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    trainer: Trainer = field(default_factory=Trainer)


