"""The worlds a run trains in, built by name: the lab (exact metrics) and SD1.5 / SDXL (user weights).

Each world supplies the UNet to distil, its noise schedule, an optional frozen encoder (VAE + text), a data
module per stage, stage-end callbacks and the final report; `hsd.train.run` drives any of them the same way.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid

from .config import Run
from .diffusion.schedule import NoiseSchedule
from .lab.evaluate import LabEvaluator, save_grid, write_table
from .lab.teacher import DEFAULT_TEACHER, load_teacher
from .lab.world import LabWorld
from .lit.data import LabData
from .rewards.feedback import FeedbackLoss, LabReward


def _log_image(trainer, tag: str, grid: torch.Tensor) -> None:
    experiment = getattr(trainer.logger, "experiment", None)
    if hasattr(experiment, "add_image"):
        experiment.add_image(tag, grid, trainer.global_step)


class LabSamples(L.Callback):
    """At the end of a stage, log k-step student samples from fixed noise to TensorBoard."""

    def __init__(self, evaluator: LabEvaluator, steps: int):
        self.evaluator, self.steps = evaluator, steps

    def on_train_end(self, trainer, module):
        _, x = self.evaluator.row("student", module.unet, self.steps, "ddim")
        grid = make_grid(x[:: max(1, x.shape[0] // 32)][:32].clamp(-1, 1) * 0.5 + 0.5, nrow=8)
        _log_image(trainer, f"samples/k{module.stage.k}_{self.steps}step", grid)


class Lab:
    """The analytic world: exact data, the shipped teacher, exact metrics in the final table."""

    def __init__(self, cfg: Run):
        self.cfg = cfg
        teacher = load_teacher(cfg.lab.teacher or DEFAULT_TEACHER)
        self.world = LabWorld(size=teacher.unet.config.sample_size)
        self.unet, self.encoder = teacher.unet, None
        self.schedule = NoiseSchedule.from_scheduler(teacher.scheduler)
        self.emb = teacher.encode(self.world.prompts + [""])
        self.evaluator = LabEvaluator(self.world, teacher, cfg.lab)

    def data(self, batches: int, seed: int, start_fn, batch_size: int) -> L.LightningDataModule:
        return LabData(self.world, self.emb[:-1], self.emb[-1:], batch_size, batches, seed, start_fn)

    def callbacks(self, k: int) -> list[L.Callback]:
        return [LabSamples(self.evaluator, k)]

    def feedback_loss(self) -> FeedbackLoss:
        return FeedbackLoss(self.cfg.feedback, LabReward(self.world))

    def report(self, made, out: Path) -> str:
        return lab_table(self.cfg, self.evaluator, self.unet, made, out)


def lab_table(cfg: Run, ev: LabEvaluator, unet, made, out: Path) -> str:
    """Teacher rows, each TSCD stage, then (when trained) the TSCD + feedback merges at weights (1, w) and
    the DMD generator."""
    from .models.lora import load_lora, plain_unet
    rows, samples, loras = [], [], made.tscd

    def add(result):
        rows.append(result[0])
        samples.append(result[1])

    unet.disable_adapters()
    add(ev.row("Teacher", unet, cfg.lab.teacher_steps, "ddim", guided=True))
    for n in cfg.lab.student_steps:
        add(ev.row("Teacher", unet, n, "ddim", guided=True))
    unet.enable_adapters()
    for k, path in loras:
        load_lora(unet, path)
        add(ev.row(f"TSCD stage k={k}", unet, k, "ddim"))
    if loras and loras[-1][0] == 1:
        for n in cfg.lab.student_steps:
            add(ev.row("TSCD final (k=1)", unet, n, "tcd"))
    # Rows built on the pre-DMD LoRA need it in the UNet: a TSCD file reloaded above, or a LoRA DMD left alone.
    pre_dmd = bool(loras) or made.dmd is None or cfg.dmd.generator == "full"
    if made.feedback is not None and pre_dmd:
        load_lora(unet, made.feedback, adapter="feedback")
        for w in cfg.feedback.merge_weights:  # exactly what `hsd lora merge TSCD FEEDBACK:w --unet` fuses
            merged = plain_unet(unet, {"default": 1.0, "feedback": w})
            for n in (1, 4):
                add(ev.row(f"TSCD + feedback, weights (1, {w:g})", merged, n, "tcd"))
    if made.dmd is not None:
        add_dmd_rows(cfg, ev, unet, made.dmd, add, baseline=pre_dmd)
    md = write_table(rows, out, f"{cfg.name}: lab world, exact metrics ({len(ev.labels)} samples, "
                                f"reference ODE at CFG {cfg.lab.eval_guidance:g})")
    save_grid(samples, out / "samples.png")
    return md


def add_dmd_rows(cfg: Run, ev: LabEvaluator, unet, path: Path, add, baseline: bool = True) -> None:
    """Timestep 999 (the unified LoRA): TCD at every student step count. Another timestep (one-step LoRA or
    UNet): LCM at that timestep, beside the TSCD LoRA sampled the same way (so the timestep alone is not
    mistaken for DMD's effect)."""
    from .models.lora import load_lora
    d = cfg.dmd
    if d.timestep == 999 and d.generator == "lora":
        load_lora(unet, path)
        for n in cfg.lab.student_steps:
            add(ev.row("DMD unified LoRA (t=999)", unet, n, "tcd"))
        return
    if baseline:
        add(ev.row("TSCD final (k=1)", unet, 1, "lcm", timestep=d.timestep))
    if d.generator == "lora":
        load_lora(unet, path)
        add(ev.row(f"DMD one-step LoRA (t={d.timestep})", unet, 1, "lcm", timestep=d.timestep))
    else:
        from diffusers import UNet2DConditionModel
        add(ev.row(f"DMD one-step UNet (t={d.timestep})", UNet2DConditionModel.from_pretrained(path), 1, "lcm",
                   timestep=d.timestep))


class SDSamples(L.Callback):
    """At the end of a stage, log k-step DDIM-trailing student images (diffusers pipeline) for a few captions."""

    def __init__(self, components, captions: list[str], steps: int, resolution: int):
        self.components, self.captions, self.steps, self.res = components, captions, steps, resolution

    def on_train_end(self, trainer, module):
        # Under FSDP a forward is collective and the components' UNet is sharded: no samples there.
        from lightning.pytorch.strategies import FSDPStrategy
        if trainer.global_rank != 0 or not self.captions or isinstance(trainer.strategy, FSDPStrategy):
            return
        from .models.components import pipeline
        from .pipelines.generate import recipe_scheduler
        pipe = pipeline(self.components)
        pipe.scheduler = recipe_scheduler("ddim", pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        # Frozen weights may be bf16 beside an fp32 VAE and LoRA: autocast lets the pipeline mix them.
        half = module.unet.dtype != torch.float32
        with torch.no_grad(), torch.autocast(module.device.type, dtype=module.unet.dtype, enabled=half):
            x = pipe(self.captions, num_inference_steps=self.steps, guidance_scale=0.0, height=self.res,
                     width=self.res, output_type="pt", generator=torch.Generator().manual_seed(0)).images
        _log_image(trainer, f"samples/k{module.stage.k}_{self.steps}step", make_grid(x.float().cpu(), nrow=4))


class SD:
    """SD1.5 / SDXL from the user's local weights; image-text pairs from shards or a folder."""

    def __init__(self, cfg: Run):
        from .models.components import check_family, load_components
        from .models.conditioning import LatentEncoder, TextConditioner
        self.cfg, m = cfg, cfg.model
        self.components = c = load_components(m.path, m.vae, m.config)
        check_family(c, cfg.world, m.path)
        frozen = getattr(torch, m.frozen_dtype)
        self.unet = c.unet.to(frozen)
        for enc in c.text_encoders:
            enc.to(frozen)
        if m.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.schedule = NoiseSchedule.from_scheduler(c.scheduler)
        text = TextConditioner(c.family, c.text_encoders, c.tokenizers)
        self.encoder = LatentEncoder(c.vae, text, m.resolution, getattr(torch, m.vae_dtype))

    def data(self, batches: int, seed: int, start_fn, batch_size: int) -> L.LightningDataModule:
        from .data import ImageTextData
        d = self.cfg.data
        return ImageTextData(shards=d.shards, folder=d.folder, resolution=self.cfg.model.resolution,
                             batch_size=batch_size, steps=batches, seed=seed, crop=d.crop,
                             flip=d.flip, num_workers=d.num_workers, start_fn=start_fn)

    def callbacks(self, k: int) -> list[L.Callback]:
        return [SDSamples(self.components, self.cfg.data.sample_prompts, k, self.cfg.model.resolution)]

    def feedback_loss(self) -> FeedbackLoss:
        """The scorers named in feedback.rewards (eval package, from feedback.scorers) on VAE-decoded x'_0, and
        with feedback.instance_weight > 0 the SOLO instance loss on COCO train images."""
        from eval.scorers import load_scorers
        from .rewards.feedback import InstanceTerm, ScorerRewards, VaeDecoder
        f, decoder = self.cfg.feedback, VaeDecoder(self.encoder.vae)
        rewards = ScorerRewards(decoder, load_scorers(f.scorers, tuple(f.rewards))) if f.rewards else None
        instance = None
        if f.instance_weight:
            from .data.coco_instances import CocoInstances
            from .rewards.instance import InstanceLoss, load_solo
            instance = InstanceTerm(CocoInstances(f.coco_annotations, f.coco_images),
                                    InstanceLoss(load_solo(f.solo, f.solo_classes)), decoder, self.cfg.model.resolution)
        return FeedbackLoss(f, rewards, instance)

    def report(self, made, out: Path) -> str:
        model = self.cfg.model.path
        lines = [f"# {self.cfg.name}: {self.cfg.world} artefacts", "",
                 "| Stage | diffusers LoRA | kohya LoRA | sample with |", "|---|---|---|---|"]
        for k, path in made.tscd:
            kohya = path.with_suffix(".kohya.safetensors")
            lines.append(f"| TSCD k={k} | {path} | {kohya} | hsd generate --model {model} "
                         f"--lora {kohya} --scheduler ddim --steps {k} |")
        if made.feedback is not None and made.tscd:
            base = made.tscd[-1][1].with_suffix(".kohya.safetensors")
            kohya = made.feedback.with_suffix(".kohya.safetensors")
            lines.append(f"| feedback | {made.feedback} | {kohya} | hsd lora merge {base} {kohya}:1.0 --out "
                         f"{out}/merged.safetensors |")
        if made.dmd is not None and self.cfg.dmd.generator == "lora":
            kohya = made.dmd.with_suffix(".kohya.safetensors")
            recipe = "tcd --steps 1 2 4 8" if self.cfg.dmd.timestep == 999 else "lcm --steps 1"
            lines.append(f"| DMD (t={self.cfg.dmd.timestep}) | {made.dmd} | {kohya} | hsd generate --model {model} "
                         f"--lora {kohya} --scheduler {recipe} |")
        elif made.dmd is not None:
            lines.append(f"| DMD one-step UNet | {made.dmd} | | hsd generate --model {model} --unet {made.dmd} "
                         f"--scheduler lcm --steps 1 |")
        md = "\n".join(lines) + "\n"
        (out / "loras.md").write_text(md)
        return md


WORLDS = {"lab": Lab, "sd15": SD, "sdxl": SD}
