"""SD1.5 / SDXL / SD3 from the user's local weights: image-text data from shards or a folder, the frozen VAE and text
encoders, hsd.scorers' scorers as rewards (the modules the eval package scores with), SOLO's instance loss, and a
report of the LoRA files made."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch

from ..diffusion.schedule import NoiseSchedule
from ..names import DIT_WORLDS
from ..models.load import load_denoiser, load_world_components
from ..rewards.feedback import FeedbackLoss
from .base import log_image

if TYPE_CHECKING:
    from ..config import Run
    from ..models.adapters import Adapters
    from .base import Artefacts


class SDSamples(L.Callback):
    """At the end of a stage, log k-step DDIM-trailing student images (diffusers pipeline) for a few captions."""

    def __init__(self, components, captions: list[str], steps: int, resolution: int):
        # components: a callable, so that a cached run loads its text encoders and VAE only here
        self.components, self.captions, self.steps, self.res = components, captions, steps, resolution

    def on_train_end(self, trainer, module):
        # Under FSDP a forward is collective and the components' UNet is sharded: no samples there.
        from lightning.pytorch.strategies import FSDPStrategy
        if trainer.global_rank != 0 or not self.captions or isinstance(trainer.strategy, FSDPStrategy):
            return
        comps = self.components()
        pipe, extra = student_pipeline(comps, self.steps)
        pipe.set_progress_bar_config(disable=True)
        away = [m for m in (comps.vae, *comps.text_encoders) if m.device != module.device]  # a cached run's
        for m in away:
            m.to(module.device)
        # Frozen weights may be bf16 beside an fp32 VAE and LoRA: autocast lets the pipeline mix them.
        half = module.unet.dtype != torch.float32
        with torch.no_grad(), torch.autocast(module.device.type, dtype=module.unet.dtype, enabled=half):
            x = pipe(self.captions, num_inference_steps=self.steps, height=self.res, width=self.res, output_type="pt",
                     generator=torch.Generator().manual_seed(0), **extra).images
        for m in away:  # back off the GPU for the next stage
            m.to("cpu")
        log_image(trainer, f"samples/k{module.stage.k}_{self.steps}step", x.float().cpu(), self.captions, nrow=1)


def student_pipeline(components, steps: int):
    """(the stock pipeline, its extra arguments) that samples a k-step student without CFG: DDIM trailing (SD1.5/SDXL)
    or the flow-matching Euler scheduler on the trailing sigmas (SD3; FLUX at its embedded guidance 3.5, the
    release's Hyper-FLUX recipe)."""
    from ..models.dit import DiTComponents, dit_pipeline
    from ..pipelines.recipes import default_guidance, recipe_scheduler
    guidance = default_guidance(components.family)
    if isinstance(components, DiTComponents):
        from ..diffusion.schedule import trailing_sigmas
        return dit_pipeline(components), {"sigmas": trailing_sigmas(steps), "guidance_scale": guidance}
    from ..models.components import pipeline
    pipe = pipeline(components)
    pipe.scheduler = recipe_scheduler("ddim", pipe.scheduler.config)
    return pipe, {"guidance_scale": guidance}



def check_files(cfg: Run) -> None:
    """The run's input paths (the model's configs and VAE, the LoRA to start from, and what a configured feedback
    loss reads) exist and are of the right kind; model.path and the data sources check their own. The loaders say
    what is wrong inside them."""
    from ..io import check_input
    m, f = cfg.model, cfg.feedback
    wanted = [("model.config", "config folder", m.config, "a diffusers folder with the model's configs and tokenizers",
               "folder"),
              ("model.vae", "VAE folder", m.vae, "a diffusers AutoencoderKL folder", "folder"),
              ("model.lora_init", "LoRA file", m.lora_init, "a .safetensors LoRA file in the diffusers or kohya layout",
               "file")]
    if f.iterations or cfg.dmd.w_feedback:
        wanted += [("feedback.scorers", "scorer weights folder", f.scorers if f.rewards else "", "the layout in "
                    "docs/eval.md", "folder")]
        if f.instance_weight:
            wanted += [("feedback.solo", "SOLO checkpoint", f.solo, "a SOLO R50-FPN .pth or .safetensors", "file"),
                       ("feedback.coco_annotations", "COCO instances file", f.coco_annotations,
                        "annotations/instances_train2017.json", "file"),
                       ("feedback.coco_images", "COCO image folder", f.coco_images, "the train2017 images", "folder"),
                       ("feedback.coco_captions", "COCO captions file", f.coco_captions,
                        "annotations/captions_train2017.json", "file")]
    for key, what, path, expected, kind in wanted:
        if path:
            check_input(path, what, f"{expected}, set by {key}", kind)


def one_batch(cfg: Run) -> tuple[int, str]:
    """The samples one step of the hungriest stage draws over all ranks, and how that number comes about."""
    sizes = {"tscd.batch_size": cfg.tscd.batch_size if cfg.tscd.stages else 0,
             "feedback.batch_size": cfg.feedback.batch_size if cfg.feedback.iterations else 0,
             "dmd.batch_size": cfg.dmd.batch_size if cfg.dmd.iterations else 0}
    key = max(sizes, key=sizes.get)
    ranks = cfg.trainer.devices * cfg.trainer.num_nodes
    return max(1, sizes[key]) * ranks, f"{key}={sizes[key]} x {ranks} rank(s)"


class SD:
    """SD1.5 / SDXL from the user's local weights; image-text pairs from shards or a folder."""

    def __init__(self, cfg: Run):
        from ..data import FolderSource, ShardSource
        from ..data.sources import check_enough
        from ..models.dit import image_tokens, tokens_at
        self.cfg, m, d = cfg, cfg.model, cfg.data
        check_files(cfg)  # every path the run will read, before any weights load or any trainer starts
        self._components = None
        if d.cache:  # the denoiser alone: the text encoders and the VAE load only when samples or feedback need them
            from ..data.cache import CachedEncoder, cache_source, check_cache, check_view, load_empty, read_manifest
            check_view(cfg)
            manifest = read_manifest(d.cache)
            check_cache(cfg, manifest)
            self.source = cache_source(d.cache, manifest, d.missing_captions)
        else:
            self.source = (ShardSource(d.shards, d.missing_captions) if d.shards else
                           FolderSource(d.folder, d.missing_captions))
        need, why = one_batch(cfg)
        check_enough(self.source, need, why)
        if d.cache:
            unet, scheduler = load_denoiser(cfg)
            tokens = tokens_at(manifest["latent_downscale"], m.resolution)
            self.encoder = CachedEncoder(cfg.world, manifest, load_empty(d.cache))
        else:
            self._components = c = load_world_components(cfg)
            unet, scheduler, tokens = c.unet, c.scheduler, image_tokens(c.vae, m.resolution)
        frozen = getattr(torch, m.frozen_dtype)
        # a dtype cast, even to float32, makes diffusers warn about "modules kept in float32: []"
        self.unet = unet.to(frozen) if frozen != torch.float32 else unet
        if m.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.schedule = NoiseSchedule.from_scheduler(scheduler, tokens)
        if not d.cache:
            self.encoder = self.latent_encoder()

    @property
    def components(self):
        """The model's components around the trained denoiser; a cached run loads the rest only now."""
        if self._components is None:
            self._components = load_world_components(self.cfg, self.unet)
        return self._components

    def latent_encoder(self):
        """The frozen VAE and text encoders as a batch encoder (LatentEncoder)."""
        from ..models.conditioning import LatentEncoder, PipelineText, TextConditioner
        c, m = self.components, self.cfg.model
        text = PipelineText(c) if c.family in DIT_WORLDS else TextConditioner(c.family, c.text_encoders, c.tokenizers)
        return LatentEncoder(c.vae, text, m.resolution, getattr(torch, m.vae_dtype))

    def data(self, batches: int, seed: int, batch_size: int) -> L.LightningDataModule:
        from ..data import ImageTextData
        d = self.cfg.data
        if d.cache:
            from ..data.cache import cached_data
            return cached_data(self.source, resolution=self.cfg.model.resolution, batch_size=batch_size,
                               steps=batches, seed=seed, num_workers=d.num_workers)
        data = ImageTextData(shards=d.shards, folder=d.folder, resolution=self.cfg.model.resolution,
                             batch_size=batch_size, steps=batches, seed=seed, crop=d.crop,
                             flip=d.flip, num_workers=d.num_workers)
        data.source = self.source  # the source opened (and checked) when the world was made
        return data

    def callbacks(self, k: int) -> list[L.Callback]:
        return [SDSamples(lambda: self.components, self.cfg.data.sample_prompts, k, self.cfg.model.resolution)]

    def feedback_loss(self) -> FeedbackLoss:
        """The scorers named in feedback.rewards (hsd.scorers, from feedback.scorers) on VAE-decoded x'_0, and
        with feedback.instance_weight > 0 the SOLO instance loss on captioned COCO train images."""
        from ..rewards.feedback import InstanceTerm, ScorerRewards, VaeDecoder
        from ..scorers.scorers import load_scorers
        encoder = self.latent_encoder() if self.cfg.data.cache else self.encoder  # cached: loaded only now
        f, decoder = self.cfg.feedback, VaeDecoder(encoder.vae)
        rewards = ScorerRewards(decoder, load_scorers(f.scorers, tuple(f.rewards))) if f.rewards else None
        instance = None
        if f.instance_weight:
            from ..data.coco_instances import CocoInstances
            from ..rewards.instance import InstanceLoss, load_solo
            instance = InstanceTerm(CocoInstances(f.coco_annotations, f.coco_images, f.coco_captions),
                                    InstanceLoss(load_solo(f.solo, f.solo_classes)), decoder, self.cfg.model.resolution,
                                    encoder.text, f.instance_start)
        return FeedbackLoss(f, rewards, instance)

    def report(self, made: Artefacts, out: Path, adapters: Adapters) -> str:
        model, flow = self.cfg.model.path, self.cfg.world in DIT_WORLDS  # diffusers-layout files, Euler sampling

        def kohya(path: Path) -> str:
            return "" if flow else str(path.with_suffix(".kohya.safetensors"))

        def usable(path: Path) -> str:
            return kohya(path) or str(path)

        lines = [f"# {self.cfg.name}: {self.cfg.world} artefacts", "",
                 "| Stage | diffusers LoRA | kohya LoRA | sample with |", "|---|---|---|---|"]
        for k, path in made.tscd:
            lines.append(f"| TSCD k={k} | {path} | {kohya(path)} | hsd generate --model {model} --lora {usable(path)} "
                         f"--scheduler {'euler' if flow else 'ddim'} --steps {k} |")
        if made.feedback is not None and made.tscd:
            base = usable(made.tscd[-1][1])
            lines.append(f"| feedback | {made.feedback} | {kohya(made.feedback)} | hsd lora merge {base} "
                         f"{usable(made.feedback)}:1.0 --out {out}/merged.safetensors |")
        if made.dmd is not None and self.cfg.dmd.generator == "lora":
            recipe = ("euler --steps 1 2 4 8" if flow else "tcd --steps 1 2 4 8") if self.cfg.dmd.timestep == 999 \
                else "lcm --steps 1"
            lines.append(f"| DMD (t={self.cfg.dmd.timestep}) | {made.dmd} | {kohya(made.dmd)} | hsd generate --model "
                         f"{model} --lora {usable(made.dmd)} --scheduler {recipe} |")
        elif made.dmd is not None:
            lines.append(f"| DMD one-step UNet | {made.dmd} | | hsd generate --model {model} --unet {made.dmd} "
                         f"--scheduler lcm --steps 1 |")
        md = "\n".join(lines) + "\n"
        (out / "loras.md").write_text(md)
        return md
