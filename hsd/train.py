"""The one training entry point: TSCD stages k = 8 -> 4 -> 2 -> 1, each resuming the last, then the table."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torchvision.utils import make_grid

from .config import Run, save_config
from .diffusion.schedule import NoiseSchedule
from .io import atomic_path
from .lab.evaluate import LabEvaluator, save_grid, write_table
from .lab.teacher import DEFAULT_TEACHER, load_teacher
from .lab.world import LabWorld
from .lit.data import LabData
from .lit.tscd import TSCDModule
from .models.lora import attach_lora, load_lora, save_lora


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temp file renamed into place: a crash never leaves a torn last.ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class SampleGrid(L.Callback):
    """At the end of a stage, log k-step student samples from fixed noise to TensorBoard."""

    def __init__(self, evaluator: LabEvaluator, steps: int):
        self.evaluator, self.steps = evaluator, steps

    def on_train_end(self, trainer, module):
        _, x = self.evaluator.row("student", module.unet, self.steps, "ddim")
        grid = make_grid(x[:: max(1, x.shape[0] // 32)][:32].clamp(-1, 1) * 0.5 + 0.5, nrow=8)
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_image(f"samples/k{module.stage.k}_{self.steps}step", grid,
                                                trainer.global_step)


def stage_lora_path(out: Path, i: int, k: int) -> Path:
    return out / f"lora_stage{i}_k{k}.safetensors"


def make_trainer(cfg: Run, sdir: Path, max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        logger=TensorBoardLogger(sdir.parent, name="tensorboard", version=sdir.name),
        callbacks=[ModelCheckpoint(dirpath=sdir / "checkpoints", save_last=True, save_top_k=0,
                                   every_n_train_steps=cfg.trainer.ckpt_every), *callbacks],
        plugins=[AtomicCheckpointIO()], log_every_n_steps=cfg.trainer.log_every,
        enable_progress_bar=cfg.trainer.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=True)


def run(cfg: Run) -> str:
    """Train every stage (skipping finished ones, resuming an interrupted one), then write the table."""
    out = Path(cfg.out_dir) / cfg.name
    save_config(cfg, out / "config.yaml")
    teacher = load_teacher(cfg.lab.teacher or DEFAULT_TEACHER)
    world = LabWorld(size=teacher.unet.config.sample_size)
    schedule = NoiseSchedule.from_scheduler(teacher.scheduler)
    emb = teacher.encode(world.prompts + [""])
    evaluator = LabEvaluator(world, teacher, cfg.lab)
    L.seed_everything(cfg.seed, verbose=False)  # the LoRA's A matrices are drawn at random
    attach_lora(teacher.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    loras = []
    for i, stage in enumerate(cfg.tscd.stages):
        path = stage_lora_path(out, i, stage.k)
        steps = max(1, round(stage.iterations * cfg.tscd.iteration_scale))
        if path.exists():
            load_lora(teacher.unet, path)
        else:
            L.seed_everything(cfg.seed + i, verbose=False)
            sdir = out / f"stage{i}_k{stage.k}"
            module = TSCDModule(teacher.unet, schedule, stage, cfg.tscd, seed=cfg.seed * 100 + i)
            data = LabData(world, emb[:-1], emb[-1:], cfg.tscd.batch_size, steps, cfg.seed * 100 + i)
            trainer = make_trainer(cfg, sdir, steps, [SampleGrid(evaluator, stage.k)])
            last = sdir / "checkpoints" / "last.ckpt"
            trainer.fit(module, datamodule=data, ckpt_path=last if last.exists() else None)
            save_lora(path, teacher.unet, {"k": str(stage.k), "rank": str(cfg.lora.rank),
                                           "alpha": str(cfg.lora.alpha)})
        loras.append((stage.k, path))
    return lab_table(cfg, evaluator, teacher.unet, loras, out)


def lab_table(cfg: Run, ev: LabEvaluator, unet, loras: list[tuple[int, Path]], out: Path) -> str:
    rows, samples = [], []

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
    md = write_table(rows, out, f"{cfg.name}: lab world, exact metrics ({len(ev.labels)} samples, "
                                f"reference ODE at CFG {cfg.lab.eval_guidance:g})")
    save_grid(samples, out / "samples.png")
    return md


