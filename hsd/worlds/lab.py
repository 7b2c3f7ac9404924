"""The lab world: an analytic Gaussian mixture with exact data, the shipped fitted teacher, and exact metrics.

Everything the lab needs lives here: its config rules, its data (clean samples and prompt embeddings, already
encoded), its reward (the exact class log-likelihood), its stage-end samples and the final table.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.batch import EpochLoader, IndexedBatches, RawBatch, batches_done, rank_of
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.solvers import expand_cond, index_cond
from ..io import atomic_path
from ..lab.evaluate import LabEvaluator, write_table
from ..lab.plots import save_plot
from ..lab.teacher import load_teacher, teacher_path
from ..lab.world import LabWorld
from ..models.adapters import FEEDBACK, TSCD
from ..models.denoisers import denoiser_class
from ..names import LAB_WORLDS
from ..rewards.feedback import FeedbackLoss
from .base import labelled_grid, log_image

if TYPE_CHECKING:
    from ..config import Run
    from ..models.adapters import Adapters
    from .base import Artefacts

class LabData(L.LightningDataModule):
    """Lab samples: class labels, clean x0 from the exact mixture, prompt embeddings (cond and uncond). Batch
    `index` is drawn from its global index alone, so ranks draw different batches and a resume rebuilds them."""

    def __init__(self, world: LabWorld, prompt_emb: Tensor, empty_emb: Tensor, batch_size: int, steps: int,
                 seed: int = 0):
        super().__init__()
        self.world, self.emb, self.empty = world, prompt_emb, empty_emb
        self.batch_size, self.steps, self.seed = batch_size, steps, seed

    def make_batch(self, index: int) -> RawBatch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        labels = torch.randint(self.world.n_classes, (self.batch_size,), generator=g)
        return {"x0": self.world.sample(labels, g).float(), "labels": labels, "cond": index_cond(self.emb, labels),
                "uncond": expand_cond(self.empty, self.batch_size)}

    def train_dataloader(self) -> DataLoader:
        # Called after a checkpoint is restored: start at the first batch not yet trained on.
        batches = IndexedBatches(self.make_batch, batches_done(self.trainer), self.steps, *rank_of(self.trainer))
        return EpochLoader(batches)


class LabReward(nn.Module):
    """The lab's exact reward: log p_data(x | prompt's class) per dimension (nats/dim)."""

    def __init__(self, world: LabWorld):
        super().__init__()
        self.world = world

    def forward(self, x0: Tensor, batch: dict) -> dict[str, Tensor]:
        return {"lab": self.world.class_log_prob(x0, batch["labels"].to(x0.device)).float() / self.world.dim}


class LabSamples(L.Callback):
    """At the end of a stage, log k-step student samples from the evaluation noise to the logger."""

    def __init__(self, evaluator: LabEvaluator, steps: int):
        self.evaluator, self.steps = evaluator, steps

    def on_train_end(self, trainer, module):
        _, x = self.evaluator.row("student", module.unet, self.steps, "ddim")
        world, per = self.evaluator.world, self.evaluator.cfg.eval_per_class
        picks = torch.cat([x[c * per:c * per + 8] for c in range(world.n_classes)])  # a row of 8 per prompt
        log_image(trainer, f"samples/k{module.stage.k}_{self.steps}step", picks.clamp(-1, 1) * 0.5 + 0.5,
                  world.prompts, nrow=8, scale=4)


class Lab:
    """The analytic world: exact data, the shipped teacher, exact metrics in the final table."""

    def __init__(self, cfg: Run):
        self.cfg = cfg
        teacher = load_teacher(cfg.lab.teacher or teacher_path(cfg.lab.world), LAB_WORLDS.get(cfg.lab.world))
        self.world = teacher.world
        self.unet, self.encoder = teacher.unet, None
        self.schedule = NoiseSchedule.from_scheduler(teacher.scheduler)
        self.emb = teacher.encode(self.world.prompts + [""])
        eval_seed = cfg.seed if cfg.lab.eval_seed < 0 else cfg.lab.eval_seed
        self.evaluator = LabEvaluator(self.world, teacher, cfg.lab, eval_seed)

    def data(self, batches: int, seed: int, batch_size: int) -> L.LightningDataModule:
        n = self.world.n_classes
        return LabData(self.world, index_cond(self.emb, slice(0, n)), index_cond(self.emb, slice(n, n + 1)), batch_size,
                       batches, seed)

    def callbacks(self, k: int) -> list[L.Callback]:
        return [LabSamples(self.evaluator, k)]

    def feedback_loss(self) -> FeedbackLoss:
        return FeedbackLoss(self.cfg.feedback, LabReward(self.world))

    def report(self, made: Artefacts, out: Path, adapters: Adapters) -> str:
        return lab_table(self.cfg, self.evaluator, adapters, made, out)


def lab_table(cfg: Run, ev: LabEvaluator, adapters: Adapters, made: Artefacts, out: Path) -> str:
    """The paper's protocol: the exact reference rows; the teacher (CFG, deterministic DDIM) at every student step
    count and at its many-step count; each TSCD stage's LoRA at its own k steps (DDIM trailing, as the released
    N-step LoRAs are used); the final k = 1 LoRA at every student step count with DDIM and with TCD; then, when
    trained, the TSCD + feedback merges at weights (1, w) and the DMD generator. A CFG-preserving recipe
    (tscd.cfg_solver = false) adds each stage's LoRA with CFG at the teacher's scale."""
    rows, samples, loras, unet, lab = [], [], made.tscd, adapters.unet, cfg.lab

    def add(result):
        rows.append(result[0])
        samples.append(result[1])

    for result in ev.reference_rows():
        add(result)
    with adapters.off():
        many = ev.row("Teacher", unet, lab.teacher_steps, "ddim", guided=True)
        ev.teacher_reference = many[1]  # traj_teacher of every row from here on
        many[0].values["traj_teacher"] = 0.0
        for n in sorted(set(lab.student_steps) - {lab.teacher_steps}):
            add(ev.row("Teacher", unet, n, "ddim", guided=True))
        add(many)
    keeps_cfg = not cfg.tscd.cfg_solver  # a CFG-preserving LoRA: also sampled with CFG, as the release's are
    with adapters.scope([TSCD]):
        for k, path in loras:
            adapters.load(path)
            add(ev.row(f"TSCD stage k={k}", unet, k, "ddim"))
            if keeps_cfg:
                add(ev.row(f"TSCD stage k={k}", unet, k, "ddim", guided=True))
        if loras and loras[-1][0] == 1:
            for kind in ("ddim", "tcd"):
                for n in lab.student_steps:
                    if not (kind == "ddim" and n == 1):  # that is the k = 1 stage row above
                        add(ev.row("TSCD final (k=1)", unet, n, kind))
        # Rows built on the pre-DMD LoRA need it in the UNet: a TSCD file reloaded above, or a LoRA DMD left alone.
        pre_dmd = bool(loras) or made.dmd is None or cfg.dmd.generator == "full"
        if made.feedback is not None and pre_dmd:
            adapters.load(made.feedback, FEEDBACK)
            for w in cfg.feedback.merge_weights:  # exactly what `hsd lora merge TSCD FEEDBACK:w --unet` fuses
                merged = adapters.fused({TSCD: 1.0, FEEDBACK: w})
                for n in (1, 4):
                    add(ev.row(f"TSCD + feedback, weights (1, {w:g})", merged, n, "tcd"))
        if made.dmd is not None:
            add_dmd_rows(cfg, ev, adapters, made.dmd, add, baseline=pre_dmd)
    title = (f"{cfg.name}: lab world '{ev.world.name}', {len(ev.labels)} samples, reference ODE at CFG "
             f"{lab.eval_guidance:g}")
    md = write_table(rows, out, title)
    save_grid(samples, out / "samples.png", ev.world.n_classes,
              [f"{r.model}{f', {r.steps} step' + 's' * (r.steps > 1) if r.steps else ''}, {r.scheduler}"
               for r in rows])
    save_plot(rows, out / "metrics.png", title)
    return md


def save_grid(samples: list[Tensor], path: Path, n_classes: int, labels: list[str]) -> None:
    """One row per table row: the first sample or two of each class (samples are class-major), upscaled for
    viewing, with the row's label (model, steps, sampler) to its left."""
    per_class = max(1, 8 // n_classes)
    picks = []
    for x in samples:
        n = x.shape[0] // n_classes
        picks.append(x[torch.cat([torch.arange(c * n, c * n + per_class) for c in range(n_classes)])])
    image = labelled_grid(torch.cat(picks).clamp(-1, 1) * 0.5 + 0.5, labels, per_class * n_classes, scale=4)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def add_dmd_rows(cfg: Run, ev: LabEvaluator, adapters: Adapters, path: Path, add, baseline: bool = True) -> None:
    """Timestep 999 (the unified LoRA): TCD at every student step count. Another timestep (one-step LoRA or
    UNet): LCM at that timestep, beside the TSCD LoRA sampled the same way (so the timestep alone is not
    mistaken for DMD's effect)."""
    d, unet = cfg.dmd, adapters.unet
    if d.timestep == 999 and d.generator == "lora":
        adapters.load(path)
        for n in cfg.lab.student_steps:
            add(ev.row("DMD unified LoRA (t=999)", unet, n, "tcd"))
        return
    if baseline:
        add(ev.row("TSCD final (k=1)", unet, 1, "lcm", timestep=d.timestep))
    if d.generator == "lora":
        adapters.load(path)
        add(ev.row(f"DMD one-step LoRA (t={d.timestep})", unet, 1, "lcm", timestep=d.timestep))
    else:
        add(ev.row(f"DMD one-step UNet (t={d.timestep})", denoiser_class(unet).from_pretrained(path), 1, "lcm",
                   timestep=d.timestep))
