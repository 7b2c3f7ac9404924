"""The one training entry point: a plan of stages (TSCD k = 8 -> 4 -> 2 -> 1, then the feedback LoRA and DMD when
configured), run by one loop, then the world's report.

Every stage is described the same way (`Stage`): its folder, its artefact, its seed slot, the settings that shape
it, the adapters it needs, how to build its LightningModule and how to save what it trained. The loop gives each
the same treatment: seed, prepare its adapters, then reuse its artefact if it exists, or train it (resuming its
last checkpoint) inside a scope that leaves the UNet's adapters as it found them.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import lightning as L
import yaml

from .config import save_config
from .errors import SIGINT_STATUS, SIGTERM_STATUS, ConfigError, Interrupted
from .io import atomic_path, check_output, is_main_process, remove_stale_temps
from .lit.consistency import ConsistencyPair
from .lit.dmd import DMDModule
from .lit.feedback import FeedbackModule
from .lit.resume import check_resumable
from .lit.sharded import save_unet
from .lit.trainer import last_checkpoint, make_trainer
from .lit.tscd import TSCDModule
from .models.adapters import FAKE, FEEDBACK, PREVIOUS, TSCD, Adapters
from .models.discriminator import build_discriminator
from .models.quantize import quantize_frozen
from .worlds import Artefacts, build_world

if TYPE_CHECKING:
    from .config import Run
    from .lit.base import StageModule
    from .worlds import World

FEEDBACK_SLOT, DMD_SLOT = 50, 60  # seed slots; TSCD stage i has slot i


def stage_seeds(seed: int, slot: int) -> tuple[int, int]:
    """(the global RNG seed set before the stage: new LoRA factors and model copies; the seed of its batches and
    per-batch noise). The one place seeds derive from the run's seed."""
    return seed + slot, seed * 100 + slot


@dataclass
class Stage:
    kind: str                                       # tscd | feedback | dmd
    name: str                                       # progress bar and messages: "tscd k=8", "feedback", "dmd"
    folder: Path                                    # checkpoints/ and settings.yaml
    artefact: Path                                  # a LoRA file or a UNet folder: its existence means done
    slot: int
    updates: int                                    # optimizer updates (batches, before accumulation)
    batch_size: int
    settings: dict                                  # the config keys that shape it (shaping_settings)
    build: Callable[[int], StageModule]             # batch seed -> the module
    save: Callable[[L.Trainer, StageModule], None]  # write the artefact (rank 0)
    reuse: Callable[[], None] = lambda: None        # load the artefact instead of training
    prepare: Callable[[], None] = lambda: None      # adapters the stage needs to be trained or reused
    callbacks: tuple = ()


def run(cfg: Run) -> str:
    """Train every stage of the plan (reusing finished ones, resuming an interrupted one), then report."""
    out = check_output(Path(cfg.out_dir) / cfg.name, "run folder (out_dir/name)")
    if is_main_process():  # the writes a killed run left unfinished, before this one writes anything
        remove_stale_temps(out)
    world = build_world(cfg)
    held = quantize_frozen(world.unet, cfg.model.quantize)  # before the LoRA: peft picks its layer by the weight
    if held.layers and is_main_process():
        print(held.line(), file=sys.stderr, flush=True)
    adapters = Adapters(world.unet)
    L.seed_everything(cfg.seed, verbose=False)  # the LoRA's A matrices are drawn at random
    adapters.attach(TSCD, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, init=cfg.model.lora_init)
    plan = stage_plan(cfg, world, adapters, out)
    refuse_changed_settings(plan)
    save_config(cfg, out / "config.yaml")
    for stage in plan:
        run_stage(cfg, world, adapters, stage)
    # the plan begins with the TSCD stages, in their order
    made = Artefacts(tscd=[(s.k, stage.artefact) for s, stage in zip(cfg.tscd.stages, plan)],
                     **{stage.kind: stage.artefact for stage in plan if stage.kind != "tscd"})
    return world.report(made, out, adapters)


def run_stage(cfg: Run, world: World, adapters: Adapters, stage: Stage) -> None:
    global_seed, batch_seed = stage_seeds(cfg.seed, stage.slot)
    L.seed_everything(global_seed, verbose=False)
    stage.prepare()
    if stage.artefact.exists():
        stage.reuse()
        return
    _write_settings(stage)
    with adapters.restoring():
        resume = last_checkpoint(stage.folder)
        if resume is not None:
            check_resumable(resume)  # a torn or foreign file is named before any trainer starts
        module = stage.build(batch_seed)
        module.grad_norms_every = cfg.trainer.grad_norms_every
        n = module.steps_per_update
        data = world.data(stage.updates * module.accumulate, batch_seed, stage.batch_size)
        trainer = make_trainer(cfg, stage.folder, stage.updates * n, cfg.trainer.ckpt_every * n, stage.callbacks,
                               list(adapters.params().values()), stage.name)
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume)
        except SystemExit:  # Lightning's answer to Ctrl-C and SIGTERM: it stops the loop, tears down and exits
            if trainer.interrupted:
                raise interrupted(cfg, stage, trainer.global_step // n, trainer.received_sigterm) from None
            raise
        adapters.unet = module.unet  # under FSDP the wrapped UNet, which later stages keep using
        stage.save(trainer, module)
        trainer.strategy.barrier()


def interrupted(cfg: Run, stage: Stage, done: int, sigterm: bool = False) -> Interrupted:
    """What Ctrl-C or SIGTERM kept: the finished stages' artefacts and this stage's last checkpoint (never a torn
    one). Lightning stops at the end of a batch on SIGTERM (a scheduler's preemption), at once on Ctrl-C."""
    ckpt = last_checkpoint(stage.folder)
    kept = (f"its last checkpoint {ckpt} (one every trainer.ckpt_every={cfg.trainer.ckpt_every} updates) is intact: "
            f"rerun the same command to resume from it" if ckpt else
            f"it had written no checkpoint yet (one every trainer.ckpt_every={cfg.trainer.ckpt_every} updates): rerun "
            f"the same command to train it afresh")
    return Interrupted(f"stage '{stage.name}' stopped by {'SIGTERM' if sigterm else 'Ctrl-C'} after {done} of "
                       f"{stage.updates} updates; {kept}; finished stages are kept",
                       SIGTERM_STATUS if sigterm else SIGINT_STATUS)


def stage_plan(cfg: Run, world: World, adapters: Adapters, out: Path) -> list[Stage]:
    """The configured stages in order. `parts` is what every stage module is built with besides its own settings."""
    parts = dict(encoder=world.encoder, fsdp=cfg.trainer.strategy == "fsdp")
    feedback_loss = functools.cache(world.feedback_loss)  # scorers and SOLO load once, and only when a stage trains
    plan = tscd_stages(cfg, world, adapters, out, parts)
    if cfg.feedback.iterations:
        plan.append(feedback_stage(cfg, world, adapters, out, parts, feedback_loss))
    if cfg.dmd.iterations:
        plan.append(dmd_stage(cfg, world, adapters, out, parts, feedback_loss))
    return plan


def tscd_stages(cfg: Run, world: World, adapters: Adapters, out: Path, parts: dict) -> list[Stage]:
    t = cfg.tscd
    disc = None  # one discriminator for every adversarial stage, drawn right after the LoRA
    if any(s.w_adv > 0 for s in t.stages):
        disc = build_discriminator(adapters.unet, t.adv)
    plan, previous = [], None
    for i, s in enumerate(t.stages):
        artefact = out / f"lora_stage{i}_k{s.k}.safetensors"
        meta = {"k": str(s.k), "stage": "tscd"}
        distils = t.teacher == "previous" and previous is not None  # stage i-1's LoRA is the teacher
        plan.append(Stage(
            kind="tscd", name=f"tscd k={s.k}", folder=out / f"stage{i}_k{s.k}", artefact=artefact, slot=i,
            updates=max(1, round(s.iterations * t.iteration_scale)), batch_size=t.batch_size,
            settings=shaping_settings(cfg, "tscd", i),
            prepare=(lambda prev=previous: _load_previous(cfg, adapters, prev)) if distils else lambda: None,
            build=lambda seed, s=s, d=distils: TSCDModule(adapters.unet, world.schedule, s, t, seed=seed, disc=disc,
                                                          previous=d, **parts),
            save=lambda trainer, _, path=artefact, meta=meta: _save_lora(cfg, trainer, adapters, TSCD, path, meta),
            reuse=lambda path=artefact: adapters.load(path), callbacks=tuple(world.callbacks(s.k))))
        previous = artefact
    return plan


def _load_previous(cfg: Run, adapters: Adapters, path: Path) -> None:
    """The previous stage's LoRA into its own frozen adapter (tscd.teacher = previous), attached once."""
    if PREVIOUS not in adapters.names:
        adapters.attach(PREVIOUS, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, init=path)  # shaped like it
    else:
        adapters.load(path, PREVIOUS)


def feedback_stage(cfg: Run, world: World, adapters: Adapters, out: Path, parts: dict, feedback_loss) -> Stage:
    """The feedback LoRA, trained on top of the frozen TSCD LoRA (its adapter is needed to reuse its file too)."""
    f, artefact = cfg.feedback, out / "lora_feedback.safetensors"
    return Stage(
        kind="feedback", name="feedback", folder=out / "feedback", artefact=artefact, slot=FEEDBACK_SLOT,
        updates=f.iterations, batch_size=f.batch_size, settings=shaping_settings(cfg, "feedback"),
        prepare=lambda: adapters.attach(FEEDBACK, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets),
        build=lambda seed: FeedbackModule(adapters.unet, world.schedule, f, feedback_loss(), seed=seed, **parts),
        save=lambda trainer, _: _save_lora(cfg, trainer, adapters, FEEDBACK, artefact, {"stage": "feedback"}),
        reuse=lambda: adapters.load(artefact, FEEDBACK))


def dmd_path(out: Path, d) -> Path:
    """The unified LoRA (timestep 999), a one-step LoRA (another timestep) or the one-step UNet folder (full)."""
    if d.generator == "full":
        return out / "unet_onestep"
    return out / ("lora_unified.safetensors" if d.timestep == 999 else f"lora_onestep_t{d.timestep}.safetensors")


def dmd_stage(cfg: Run, world: World, adapters: Adapters, out: Path, parts: dict, feedback_loss) -> Stage:
    """DMD on the TSCD LoRA: a LoRA (generator=lora) or the one-step UNet folder (generator=full)."""
    d, artefact = cfg.dmd, dmd_path(out, cfg.dmd)

    def build(seed: int) -> DMDModule:  # draws in this order: the fake LoRA's factors, then the two copies
        if d.fake == "lora":
            adapters.attach(FAKE, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
        checkpointing = cfg.model.gradient_checkpointing
        gen = adapters.trained_copy({TSCD: 1.0}, checkpointing) if d.generator == "full" else None
        fake = adapters.trained_copy({}, checkpointing) if d.fake == "full" else None
        last = cfg.tscd.stages[-1] if cfg.tscd.stages else None  # validation: w_consistency needs a stage
        pair = ConsistencyPair(world.schedule, last.k, last.grid_steps, cfg.tscd) if d.w_consistency else None
        return DMDModule(adapters.unet, world.schedule, d, feedback_loss() if d.w_feedback else None, seed=seed,
                         generator_unet=gen, fake_unet=fake, consistency=pair, **parts)

    def save(trainer: L.Trainer, module: DMDModule) -> None:
        if d.generator == "lora":
            _save_lora(cfg, trainer, adapters, TSCD, artefact, {"stage": "dmd", "timestep": str(d.timestep)})
        else:  # every rank: a sharded copy is gathered to rank 0, which writes it
            save_unet(module.gen_unet, artefact)

    return Stage(kind="dmd", name="dmd", folder=out / "dmd", artefact=artefact, slot=DMD_SLOT, updates=d.iterations,
                 batch_size=d.batch_size, settings=shaping_settings(cfg, "dmd"), build=build, save=save,
                 reuse=lambda: adapters.load(artefact) if d.generator == "lora" else None)


def _save_lora(cfg: Run, trainer: L.Trainer, adapters: Adapters, name: str, path: Path, meta: dict) -> None:
    if trainer.is_global_zero:
        adapters.save(path, name, {**meta, "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.alpha),
                                   "world": cfg.world})


# ---- the settings that shape a stage: a rerun into the same folder must not change them ----
# Keys that shape no stage's result: names and places, logging, speed and memory, the report's own settings.
COSMETIC = ("name", "out_dir", "trainer.accelerator", "trainer.strategy", "trainer.progress_bar", "trainer.log_every",
            "trainer.ckpt_every", "trainer.logger", "trainer.grad_norms_every", "data.num_workers",
            "data.sample_prompts", "model.gradient_checkpointing", "feedback.merge_weights")
REPORT_ONLY = "lab."  # the lab's evaluation settings; lab.world and lab.teacher, the model, shape every stage
SHAPING_LAB = ("lab.world", "lab.teacher")
# How an unfinished stage's batches are split: they matter to resuming it, not to reusing a finished artefact.
RESUME_ONLY = ("trainer.devices", "trainer.num_nodes", "trainer.precision")
# What DMD takes from the feedback section when dmd.w_feedback > 0: the losses, not the feedback stage's training.
FEEDBACK_LOSS = ("feedback.rewards", "feedback.instance_weight", "feedback.t_range", "feedback.steps",
                 "feedback.scorers", "feedback.solo", "feedback.solo_classes", "feedback.coco_annotations",
                 "feedback.coco_images", "feedback.coco_captions", "feedback.instance_start")


def shaping_settings(cfg: Run, kind: str, index: int = 0) -> dict:
    """The settings that TSCD stage `index`, the feedback stage or the DMD stage depends on, as {dotted key: value}
    (lists and mappings whole): the shared ones (seed, world, model, LoRA, data), the TSCD settings with the
    stages up to it, and the stage's own section (DMD also the feedback losses when it uses them)."""
    keep = {}
    for key, value in _flatten(cfg).items():
        section = key.split(".")[0]
        if key.startswith(COSMETIC) or (key.startswith(REPORT_ONLY) and key not in SHAPING_LAB):
            continue
        if section == "feedback" and not (kind == "feedback" or (kind == "dmd" and cfg.dmd.w_feedback
                                                                 and key.startswith(FEEDBACK_LOSS))):
            continue
        if section == "dmd" and kind != "dmd":
            continue
        keep[key] = value[:index + 1] if key == "tscd.stages" and kind == "tscd" else value
    return keep


def _flatten(section, prefix: str = "") -> dict:
    """{dotted key: value} over the config's sections; list and mapping values (stages, rewards) stay whole."""
    out = {}
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            out |= _flatten(value, f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = _plain(value)
    return out


def _plain(value):
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def refuse_changed_settings(plan: list[Stage]) -> None:
    """A stage that already has an artefact or a checkpoint must not be reused or resumed under other settings.

    Resuming may lengthen or shorten the stage itself (its batches are drawn by index, so the first ones do not
    depend on how many follow); reusing a finished artefact may change how the batches are split over devices."""
    for stage in plan:
        saved, finished = stage.folder / "settings.yaml", stage.artefact.exists()
        if not saved.exists() or not (finished or last_checkpoint(stage.folder)):
            continue
        before, now = yaml.safe_load(saved.read_text()) or {}, stage.settings
        if not finished:
            before, now = _without_length(before, stage.kind), _without_length(now, stage.kind)
        # a key of only one side is a field a newer or older hsd has and this one lacks: not held against the run
        changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k]
                         and not (finished and k.startswith(RESUME_ONLY)))
        if changed:
            diffs = "; ".join(f"{k}: {_short(before[k])} -> {_short(now[k])}" for k in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise ConfigError(f"{stage.folder.parent} already holds stage '{stage.name}' trained with other settings "
                              f"({diffs}{more}); use another name= or out_dir=, or restore those settings")


def _without_length(settings: dict, kind: str) -> dict:
    """The settings without the stage's own number of iterations."""
    out = {k: v for k, v in settings.items() if k not in (f"{kind}.iterations", "tscd.iteration_scale")}
    if kind == "tscd" and settings.get("tscd.stages"):
        out["tscd.stages"] = [*settings["tscd.stages"][:-1], {k: v for k, v in settings["tscd.stages"][-1].items()
                                                              if k != "iterations"}]
    return out


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _write_settings(stage: Stage) -> None:
    with atomic_path(stage.folder / "settings.yaml") as tmp:
        Path(tmp).write_text(yaml.safe_dump(stage.settings, sort_keys=True))
