"""A configured run's parts as `hsd.worlds.sd` and `hsd.train` build them, on the meta device (no weights), and
each stage's LightningModule on them (hsd.memory.stage counts and traces them).

The parts of the whole plan are built once: the components of the registered architecture (the world's, or a
tiny one), every LoRA adapter the plan attaches, the discriminator, DMD's full copies (the same `Adapters.fused`
calls as hsd.train) and the scorers of the rewards (hsd.scorers' modules at the real architectures' sizes).
A stage counts only the adapters attached by then. SOLO (the instance loss) needs mmdet and is not counted: a
stand-in keeps the instance term's UNet and VAE work in the traced step.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..config import Run
from ..errors import ConfigError
from ..models.adapters import FAKE, FEEDBACK, PREVIOUS, TSCD, Adapters
from ..names import DIT_WORLDS

REWARD_SCORERS = ("Aes", "ImageReward", "CLIP", "PickScore")
# Lightning's precision names -> the dtype every module is cast to ("-true" precisions)
TRUE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64, "64": torch.float64}
HALF_MIXED = ("bf16-mixed", "bf16", "16-mixed", "16")  # autocast to a 16-bit dtype


@dataclass
class Parts:
    cfg: Run
    family: str
    unet: nn.Module
    encoder: nn.Module
    schedule: object
    adapters: Adapters
    disc: nn.Module | None
    gen: nn.Module | None
    fake: nn.Module | None
    feedback: nn.Module | None   # hsd.rewards.feedback.FeedbackLoss, or None


@dataclass(frozen=True)
class StageSpec:
    kind: str      # tscd | feedback | dmd
    name: str
    index: int     # TSCD stage index (0 for the others)
    batch: int     # micro-batch per rank


def plan(cfg: Run) -> list[StageSpec]:
    """The stages hsd.train.stage_plan runs, in order."""
    out = [StageSpec("tscd", f"tscd k={s.k}", i, cfg.tscd.batch_size) for i, s in enumerate(cfg.tscd.stages)]
    if cfg.feedback.iterations:
        out.append(StageSpec("feedback", "feedback", 0, cfg.feedback.batch_size))
    if cfg.dmd.iterations:
        out.append(StageSpec("dmd", "dmd", 0, cfg.dmd.batch_size))
    return out


def adapters_at(cfg: Run, spec: StageSpec) -> set[str]:
    """The adapters the UNet carries in a stage (hsd.train attaches them as the plan goes and never removes one)."""
    names = {TSCD}
    if cfg.tscd.teacher == "previous" and len(cfg.tscd.stages) > 1 and (spec.kind != "tscd" or spec.index > 0):
        names.add(PREVIOUS)
    if spec.kind in ("feedback", "dmd") and cfg.feedback.iterations:
        names.add(FEEDBACK)
    if spec.kind == "dmd" and cfg.dmd.fake == "lora":
        names.add(FAKE)
    return names


def _needs_feedback_loss(cfg: Run) -> bool:
    return bool(cfg.feedback.iterations or (cfg.dmd.iterations and cfg.dmd.w_feedback))


def build_parts(cfg: Run, arch: str) -> Parts:
    """Every part of the plan on the meta device; the scheduler (its tables feed the step's bookkeeping), the
    tokenizers and the noise schedule are real."""
    from diffusers.utils import logging as diffusers_logging
    if cfg.trainer.precision.startswith("transformer-engine"):
        raise ConfigError(f"hsd memory does not model trainer.precision={cfg.trainer.precision} (FP8 layers); "
                          f"use bf16-mixed for an upper bound")
    meta = torch.device("meta")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" at every dtype cast
    try:
        return _build_parts(cfg, arch, meta)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _build_parts(cfg: Run, arch: str, meta: torch.device) -> Parts:
    from diffusers import DDIMScheduler

    from ..diffusion.schedule import NoiseSchedule
    from ..models.components import ARCHS, build_components
    from ..models.conditioning import LatentEncoder, TextConditioner
    from ..models.discriminator import build_discriminator
    from ..models.dit import DIT_ARCHS, build_dit, image_tokens
    m = cfg.model
    if arch in DIT_ARCHS:  # SD3 / FLUX: the transformer, its VAE and text encoders, its pipeline's encode_prompt
        from diffusers import FlowMatchEulerDiscreteScheduler

        from ..models.conditioning import PipelineText
        with meta:
            c = build_dit(arch, seed=cfg.seed, t5=m.t5)
        scheduler = FlowMatchEulerDiscreteScheduler(**DIT_ARCHS[arch].scheduler)
    else:
        with meta:
            c = build_components(arch, seed=cfg.seed)
        scheduler = DDIMScheduler(**ARCHS[arch].scheduler)
    frozen = getattr(torch, m.frozen_dtype)
    unet = c.unet.to(frozen) if frozen != torch.float32 else c.unet  # as hsd.worlds.sd.SD
    for enc in c.text_encoders:
        enc.to(frozen)
    if m.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    text = PipelineText(c) if c.family in DIT_WORLDS else TextConditioner(c.family, c.text_encoders, c.tokenizers)
    encoder = LatentEncoder(c.vae, text, m.resolution, getattr(torch, m.vae_dtype))
    adapters = Adapters(unet)
    with meta:
        adapters.attach(TSCD, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)  # lora_init: assumed this shape
        disc = build_discriminator(unet, cfg.tscd.adv) if any(s.w_adv > 0 for s in cfg.tscd.stages) else None
        names = set().union(*(adapters_at(cfg, s) for s in plan(cfg)))
        for name in (PREVIOUS, FEEDBACK, FAKE):
            if name in names:
                adapters.attach(name, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
        d = cfg.dmd
        checkpointing = cfg.model.gradient_checkpointing  # the full copies exactly as hsd.train's DMD stage makes them
        gen = adapters.trained_copy({TSCD: 1.0}, checkpointing) if d.iterations and d.generator == "full" else None
        fake = adapters.trained_copy({}, checkpointing) if d.iterations and d.fake == "full" else None
        scorers = _scorers(cfg, "tiny" if arch.startswith("tiny") else "real") if _needs_feedback_loss(cfg) else {}
    feedback = _feedback_loss(cfg, encoder, scorers) if _needs_feedback_loss(cfg) else None
    schedule = NoiseSchedule.from_scheduler(scheduler, image_tokens(c.vae, m.resolution))  # FLUX: its dynamic shift
    parts = Parts(cfg, c.family, unet, encoder, schedule, adapters, disc, gen, fake, feedback)
    if cfg.trainer.precision in TRUE_DTYPES:
        for module in modules_of(parts):
            module.to(TRUE_DTYPES[cfg.trainer.precision])
    return parts


def modules_of(parts: Parts) -> list[nn.Module]:
    return [m for m in (parts.unet, parts.encoder, parts.disc, parts.gen, parts.fake, parts.feedback) if m is not None]


def _scorers(cfg: Run, size: str) -> dict[str, nn.Module]:
    """hsd.scorers' reward modules with the architectures `load_scorers` builds (random weights: meta here)."""
    from ..scorers import clip
    from ..scorers.heads import ScoreHead
    from ..scorers.random_weights import CLIP_ARCH, PICKSCORE_REAL, PICKSCORE_TINY
    from ..scorers.scorers import AestheticScorer, ClipScorer, PickScorer
    names = set(cfg.feedback.rewards)
    unknown = sorted(names - set(REWARD_SCORERS))
    if unknown:
        raise ConfigError(f"feedback.rewards: unknown reward(s) {unknown} for world {cfg.world!r}; known: "
                          f"{', '.join(REWARD_SCORERS)}")
    b32, l14 = CLIP_ARCH[size]
    out = {}
    if "CLIP" in names:
        out["CLIP"] = ClipScorer(clip.build_clip(b32))
    if "Aes" in names:
        out["Aes"] = AestheticScorer(clip.build_clip(l14), ScoreHead())
    if "PickScore" in names:
        out["PickScore"] = _pickscore(PICKSCORE_REAL if size == "real" else PICKSCORE_TINY, PickScorer)
    if "ImageReward" in names:
        out["ImageReward"] = _imagereward(size)
    return {k: v.eval().requires_grad_(False) for k, v in out.items()}


def _pickscore(arch: dict, scorer_cls):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from ..scorers import clip
    model = CLIPModel(CLIPConfig(projection_dim=arch["projection_dim"], text_config=arch["text_config"],
                                 vision_config=arch["vision_config"]))
    with tempfile.TemporaryDirectory() as tmp, torch.device("cpu"):
        tokenizer = CLIPTokenizer.from_pretrained(clip.write_hf_tokenizer(Path(tmp)))
    return scorer_cls(model, tokenizer)


def _imagereward(size: str):
    """ImageReward as `load_imagereward` assembles it, with the configs read off the official layout's shapes."""
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from ..scorers.heads import ScoreHead
    from ..scorers.imagereward import ImageRewardScorer, _text_config, _tokenizer, _vision_config
    from ..scorers.imagereward_weights import imagereward_official_shapes, med_config_for, write_bert_vocab
    from ..scorers.random_weights import BERT_REAL, BERT_TINY
    med = med_config_for(**(BERT_REAL if size == "real" else BERT_TINY))
    shapes = imagereward_official_shapes(med, None if size == "real" else dict(width=64, depth=2))
    layout = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in shapes.items()}
    vcfg = _vision_config(layout, None)
    tcfg = _text_config(med, vcfg.hidden_size)
    with tempfile.TemporaryDirectory() as tmp, torch.device("cpu"):
        write_bert_vocab(Path(tmp))
        tokenizer = _tokenizer(Path(tmp))
    return ImageRewardScorer(BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False),
                             ScoreHead(tcfg.hidden_size), tokenizer)


class _StandInCoco:
    """One square image with one caption: the instance term's data, for its UNet and VAE work."""

    def __len__(self) -> int:
        return 1

    def sample(self, i: int, size: int):
        return torch.zeros(3, size, size), {}

    def caption(self, i: int, g: torch.Generator) -> str:
        return "a photo of a cat on a sofa"


class _StandInLoss(nn.Module):
    """In place of SOLO's loss (mmdet): a scalar of the decoded pixels, so the gradient still flows back."""

    def forward(self, pixels: torch.Tensor, instances) -> torch.Tensor:
        return pixels.float().mean()


def _feedback_loss(cfg: Run, encoder, scorers: dict):
    """hsd.worlds.sd.SD.feedback_loss on these parts (SOLO and COCO replaced by the stand-ins above)."""
    from ..rewards.feedback import FeedbackLoss, InstanceTerm, ScorerRewards, VaeDecoder
    f, decoder = cfg.feedback, VaeDecoder(encoder.vae)
    rewards = ScorerRewards(decoder, scorers) if f.rewards else None
    instance = None
    if f.instance_weight:
        instance = InstanceTerm(_StandInCoco(), _StandInLoss(), decoder, cfg.model.resolution, encoder.text,
                                f.instance_start)
    return FeedbackLoss(f, rewards, instance)


def build_module(parts: Parts, spec: StageSpec, fsdp: bool, quick: bool = True):
    """The stage's LightningModule as hsd.train builds it (DMD with quick: one fake update and one teacher
    step of the MSE target: each repeat holds the same memory as the first, and they run one after another)."""
    from ..lit.consistency import ConsistencyPair
    from ..lit.dmd import DMDModule
    from ..lit.feedback import FeedbackModule
    from ..lit.tscd import TSCDModule
    cfg, common = parts.cfg, dict(encoder=parts.encoder, fsdp=fsdp)
    if spec.kind == "tscd":
        t = replace(cfg.tscd, optimizer="adamw")  # the moments' size is counted from the config, not built here
        previous = cfg.tscd.teacher == "previous" and spec.index > 0
        return TSCDModule(parts.unet, parts.schedule, cfg.tscd.stages[spec.index], t, disc=parts.disc,
                          previous=previous, **common)
    if spec.kind == "feedback":
        return FeedbackModule(parts.unet, parts.schedule, cfg.feedback, parts.feedback, **common)
    d = replace(cfg.dmd, fake_updates=1, mse_steps=1) if quick else cfg.dmd
    last = cfg.tscd.stages[-1] if cfg.tscd.stages else None
    pair = ConsistencyPair(parts.schedule, last.k, last.grid_steps, cfg.tscd) if d.w_consistency else None
    return DMDModule(parts.unet, parts.schedule, d, parts.feedback if d.w_feedback else None,
                     generator_unet=parts.gen, fake_unet=parts.fake, consistency=pair, **common)


def optimizer_groups(module) -> list[list[torch.Tensor]]:
    """The trained tensors of each optimizer, in configure_optimizers' order."""
    opts = module.configure_optimizers()
    opts = opts if isinstance(opts, (list, tuple)) else [opts]
    return [[p for g in o.param_groups for p in g["params"]] for o in opts]
