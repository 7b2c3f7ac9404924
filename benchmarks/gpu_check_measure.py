"""One measurement of the GPU check, in its own process (benchmarks/gpu_check.py starts it):

    python benchmarks/gpu_check_measure.py NAME --result FILE --work DIR --deadline EPOCH --params JSON [--dry-run]

It writes FILE after every row, so the rows that finished survive a kill at the deadline; a row that fails (an OOM,
say) is recorded with its one-line error and the next row runs. Random components are drawn on the measuring
device (drawing SDXL on one CPU thread takes about 70 s); the benchmarks' own functions do the measuring.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse"


def one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


class Result:
    """The measurement's rows, notes and info, rewritten to its file after every change."""

    def __init__(self, path: Path, params: dict, deadline: float):
        self.path, self.deadline = path, deadline
        self.data = {"params": params, "rows": [], "notes": [], "info": {}}

    def left(self) -> float:
        return self.deadline - time.time()

    def add(self, label: str, **row) -> None:
        self.data["rows"].append({"label": label, **row})
        print(f"[{label}] {row}", flush=True)
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def free(dev: str) -> None:
    import torch
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def peak_gib(dev: str) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None


def cpu_scheduler(scheduler):
    """The scheduler rebuilt outside the device context, its tables on the CPU as when loaded from a folder."""
    return type(scheduler).from_config(scheduler.config)


def env(res: Result, p: dict, dev: str, work: Path) -> None:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "cuda_expected": dev == "cuda", "cuda_available": torch.cuda.is_available(),
            "device_count": torch.cuda.device_count(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu_name": props.name, "gpu_memory_gib": props.total_memory / 2**30,
                 "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported()}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,mig.mode.current", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            info["nvidia_smi"] = smi.splitlines()[0] if smi else None
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = one_line(e)
    res.data["info"] = info
    res.add("device", values={"cuda_available": info["cuda_available"], "device_count": info["device_count"],
                              "gpu_memory_gib": info.get("gpu_memory_gib")})


def tscd(res: Result, p: dict, dev: str, work: Path) -> None:
    """sd_train_memory's TSCD step (discriminator on for a UNet) per micro-batch, checkpointing off/on, then its k-step
    generation latency (hsd's generator vs. the stock pipeline: 1 step for SD1.5/SDXL, 4 for SD3); rows that would
    overrun the budget are skipped."""
    import sd_train_memory as sdm
    import torch
    args = sdm.parser().parse_args(["--arch", p["arch"], "--resolution", str(p["resolution"]), "--device", dev,
                                    "--steps", str(p["steps"]), "--warmup", str(p["warmup"]),
                                    "--precision", "bf16-mixed", "--frozen-dtype", "bfloat16"])
    t = time.perf_counter()
    with torch.device(dev):
        comps = sdm.prepare(args)
    comps.scheduler = cpu_scheduler(comps.scheduler)
    disc = "on (the recipe's adversarial stages)" if sdm.adversarial(comps, args) else "off (a transformer)"
    gen = f"{sdm.generation_steps(comps)}-step generation"
    res.note(f"{p['arch']} drawn on {dev} in {time.perf_counter() - t:.1f} s; frozen weights bf16, LoRA rank 64 fp32, "
             f"bf16-mixed, discriminator {disc}, {args.steps} timed steps after {args.warmup} warm-up")
    last = None  # (seconds, micro-batch) of the last row that ran
    for micro in p["micro"]:
        for ckpt in (False, True):
            label = f"micro-batch {micro}, checkpointing {'on' if ckpt else 'off'}"
            need = last[0] * micro / last[1] if last else 0.0
            if res.left() - p["gen_reserve"] < need:
                res.add(label, skipped=f"skipped: {res.left():.0f} s left, about {need:.0f} s needed")
                continue
            t = time.perf_counter()
            try:
                sec, peak = sdm.measure(comps, args, micro, ckpt)
                res.add(label, values={"micro_batch": micro, "grad_checkpointing": ckpt, "s_per_step": sec,
                                       "images_per_s": micro / sec, "peak_gib": peak})
            except Exception as e:  # an OOM or any failure of one configuration: recorded, the next one runs
                traceback.print_exc()
                res.add(label, error=one_line(e))
            free(dev)
            last = (time.perf_counter() - t, micro)
    if res.left() < 3:
        res.add(gen, table="generation", skipped="skipped: no time left in the measurement's budget")
        return
    comps.unet.disable_adapters()  # as sd_train_memory: a fused LoRA costs the base architecture's time
    ours, stock = sdm.generation_latency(comps, args)
    guidance = sdm.RECIPES.get(comps.family, (1, 0.0))[1]
    sampler = "Euler on the trailing sigmas" if comps.family in sdm.FLOW else "DDIM trailing"
    sampler += f", guidance {guidance:g}" + (" (embedded)" if comps.family == "flux" else "")
    res.add(gen, table="generation", values={"hsd_ms": ours * 1000, "stock_ms": stock * 1000, "ratio": ours / stock},
            note=f"{p['resolution']} px, {sampler}, medians of {args.steps} after 2 warm-up")


def tscd_quantized(res: Result, p: dict, dev: str, work: Path) -> None:
    """The one-GPU FLUX setting of issue 23: sd_train_memory's TSCD step on a base quantized per mode (torchao),
    with the conditioning encoded once and the text encoders and VAE off the device (as data.cache), micro-batch
    `micro`, gradient checkpointing on; step time and peak memory per mode."""
    import sd_train_memory as sdm
    import torch
    for mode in p["quantize"]:
        label = f"{mode} base, cached conditioning, micro-batch {p['micro']}, checkpointing on"
        if res.left() < 20:
            res.add(label, skipped=f"skipped: {res.left():.0f} s left")
            continue
        comps = None
        try:
            args = sdm.parser().parse_args(["--arch", p["arch"], "--resolution", str(p["resolution"]), "--device", dev,
                                            "--steps", str(p["steps"]), "--warmup", str(p["warmup"]),
                                            "--precision", "bf16-mixed", "--frozen-dtype", "bfloat16",
                                            "--quantize", mode, "--cached"])
            with torch.device(dev):
                comps = sdm.prepare(args)
            comps.scheduler = cpu_scheduler(comps.scheduler)
            sec, peak = sdm.measure(comps, args, p["micro"], True)
            res.add(label, values={"quantize": mode, "micro_batch": p["micro"], "s_per_step": sec,
                                   "images_per_s": p["micro"] / sec, "peak_gib": peak})
        except Exception as e:  # an OOM or a kernel the GPU lacks: recorded, the next mode runs
            traceback.print_exc()
            res.add(label, error=one_line(e))
        del comps
        free(dev)


def dmd(res: Result, p: dict, dev: str, work: Path) -> None:
    """The one-step UNet's DMD stage as `hsd train experiments/sdxl/onestep_unet.yaml` builds it (hsd.train's stage
    plan, make_trainer and its strategy), on random components, timed per batch; checkpoints off (a full
    checkpoint of two SDXL copies and their AdamW states is about 60 GB)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from PIL import Image
    from sd_train_memory import StepTimer

    import hsd.models.components as hc
    from hsd.config import load_config
    from hsd.lit.trainer import make_trainer
    from hsd.models.adapters import TSCD, Adapters
    from hsd.train import stage_plan
    from hsd.worlds import build_world
    from hsd.worlds.sd import one_batch
    folder, n = work / "dmd", p["warmup"] + p["steps"]
    cfg = load_config([str(ROOT / "experiments" / "sdxl" / "onestep_unet.yaml")], [
        "name=gpu_check_dmd", f"out_dir={folder / 'runs'}", f"model.path={folder / 'model'}",
        f"data.folder={folder / 'images'}", "data.num_workers=0", f"model.resolution={p['resolution']}",
        "model.frozen_dtype=bfloat16", "model.gradient_checkpointing=true", "trainer.devices=1", "trainer.num_nodes=1",
        f"trainer.accelerator={'gpu' if dev == 'cuda' else 'cpu'}", f"trainer.strategy={p['strategy']}",
        "trainer.precision=bf16-mixed", "trainer.logger=csv", "trainer.progress_bar=false", f"dmd.iterations={n}",
        "dmd.batch_size=1", "dmd.w_feedback=0.0"])
    (folder / "images").mkdir(parents=True)  # one batch of the plan's hungriest stage, as the world checks
    for i in range(one_batch(cfg)[0]):
        Image.new("RGB", (p["resolution"],) * 2, (120, 90, 60)).save(folder / "images" / f"{i}.png")
        (folder / "images" / f"{i}.txt").write_text(PROMPT)
    res.note(f"recipe experiments/sdxl/onestep_unet.yaml: generator={cfg.dmd.generator}, fake={cfg.dmd.fake}, "
             f"timestep {cfg.dmd.timestep}, {cfg.dmd.fake_updates} fake updates, w_mse {cfg.dmd.w_mse} "
             f"({cfg.dmd.mse_steps} teacher steps), guidance {cfg.dmd.guidance}; batch 1, gradient checkpointing, "
             f"strategy {cfg.trainer.strategy}, devices 1; dmd.w_feedback 0 (the feedback step is measured apart); "
             f"{one_batch(cfg)[0]} images in the data folder, no loader workers")
    t = time.perf_counter()
    with torch.device(dev):
        comps = hc.build_components(p["arch"])
    comps.scheduler = cpu_scheduler(comps.scheduler)
    real, hc.load_components = hc.load_components, lambda *a, **k: comps  # the world over these components
    try:
        world = build_world(cfg)
    finally:
        hc.load_components = real
    adapters = Adapters(world.unet)
    L.seed_everything(cfg.seed, verbose=False)
    adapters.attach(TSCD, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    stage = next(s for s in stage_plan(cfg, world, adapters, folder / "runs" / cfg.name) if s.kind == "dmd")
    timer = StepTimer()
    with adapters.restoring():
        with torch.device(dev):  # hsd draws the copies' UNets at random before loading them: on the GPU, fast
            module = stage.build(cfg.seed)
        build_s = time.perf_counter() - t
        copies = [u for u in (module.gen_unet, module.fake_unet) if u is not None]
        res.data["info"] = {"copy_params": [sum(x.numel() for x in u.parameters()) for u in copies],
                            "copies_checkpointing": [bool(u.is_gradient_checkpointing) for u in copies]}
        steps = stage.updates * module.steps_per_update
        trainer = make_trainer(cfg, stage.folder, steps, 10 * steps, [timer], list(adapters.params().values()), "dmd")
        trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
        data = world.data(stage.updates * module.accumulate, cfg.seed, stage.batch_size)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, datamodule=data)
    sec = statistics.median(timer.times[p["warmup"]:])
    res.data["info"]["checkpoint_files"] = sum(1 for f in (stage.folder / "checkpoints").rglob("*") if f.is_file())
    res.add(f"DMD step ({type(trainer.strategy).__name__})", values={
        "s_per_step": sec, "peak_gib": peak_gib(dev), "build_s": build_s,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if dev == "cuda" else None},
        note=f"1 generator + {cfg.dmd.fake_updates} fake updates per step; build = components, world, copies")


def scorers(res: Result, p: dict, dev: str, work: Path) -> None:
    """Random-weight scorer files in the official layouts (the feedback and eval measurements read them)."""
    import torch

    from hsd.scorers import random_weights as rw
    target, partial, t = work / "scorers", work / "scorers.partial", time.perf_counter()
    ir = rw.write_random_imagereward  # draws from seeded CPU generators key by key: on the CPU, always

    def ir_on_cpu(*a, **k):
        with torch.device("cpu"):
            return ir(*a, **k)
    rw.write_random_imagereward = ir_on_cpu
    try:
        with torch.device(dev):  # the three CLIPs and the aesthetic head are drawn on the device (fast)
            rw.write_random_scorers(partial, p["size"])
    except Exception as e:
        if dev == "cpu":
            raise
        res.note(f"drawing the scorers on the GPU failed ({one_line(e)}); drawn on the CPU")
        shutil.rmtree(partial, ignore_errors=True)
        rw.write_random_scorers(partial, p["size"])
    os.replace(partial, target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    res.add(f"{p['size']} scorers", values={"seconds": time.perf_counter() - t, "gib_on_disk": size / 2**30})


def feedback(res: Result, p: dict, dev: str, work: Path) -> None:
    """feedback_dmd_step's feedback stage (Aes + ImageReward hinge, and SOLO when mmdet/mmcv import)."""
    import feedback_dmd_step as fd
    import sd_train_memory as sdm
    solo = all(importlib.util.find_spec(m) for m in ("mmdet", "mmcv"))
    args = fd.parser().parse_args(
        ["--arch", p["arch"], "--resolution", str(p["resolution"]), "--scorers-size", p["size"],
         "--scorers", str(work / "scorers"), "--stages", "feedback", "--build-device", dev, "--device", dev,
         "--precision", "bf16-mixed", "--frozen-dtype", "bfloat16", "--steps", str(p["steps"]),
         "--warmup", str(p["warmup"])] + ([] if solo else ["--no-instance"]))
    if not solo:
        res.note("SOLO instance term off: mmdet/mmcv do not import here (on a GPU it needs a CUDA build of mmcv)")
    t = time.perf_counter()
    sd, cfg = fd.build(args)
    res.note(f"components drawn, saved and loaded as a model folder, scorers loaded: {time.perf_counter() - t:.1f} s")
    for name, make in fd.stages(sd, cfg, args).items():
        sec, peak = sdm.timed_fit(make(), args, fd.batches(args))
        res.add(name, values={"s_per_step": sec, "peak_gib": peak},
                note=f"batch {args.batch}, {cfg.feedback.steps}-step ReFL grid")


def evaluate(res: Result, p: dict, dev: str, work: Path) -> None:
    """eval_pass's hsd side: `evaluate_spec` over N PNGs on disk, all four scorers on `dev`."""
    import eval_pass as ep
    import torch
    torch.set_grad_enabled(False)
    args = ep.parser().parse_args(["--size", p["size"], "--n", str(p["n"]), "--image-size", str(p["image_size"]),
                                   "--batch", str(p["batch"]), "--weights", str(work / "scorers")])
    t = time.perf_counter()
    bench = ep.prepare(args, dev)
    load = time.perf_counter() - t
    sec, summary = ep.hsd_pass(bench, args.batch, dev)
    res.add(f"{args.n} images of {args.image_size} px, batch {args.batch}", values={
        "images": args.n, "seconds": sec, "images_per_s": args.n / sec, "load_s": load},
        note="decode once, one crop, batched scorers, records appended; the first batch's warm-up included")


MEASUREMENTS = {"env": env, "tscd_sd15": tscd, "tscd_sdxl": tscd, "tscd_sd3": tscd, "tscd_flux": tscd, "tscd_flux_quantized": tscd_quantized, "dmd_sdxl": dmd,
                "scorers": scorers, "feedback_sd15": feedback, "eval": evaluate}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=list(MEASUREMENTS))
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--params", default="{}")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args()
    res = Result(a.result, json.loads(a.params), a.deadline)
    res.save()
    try:
        MEASUREMENTS[a.name](res, res.data["params"], "cpu" if a.dry_run else "cuda", a.work)
    except Exception as e:
        traceback.print_exc()
        res.data["error"] = one_line(e)
        res.save()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
