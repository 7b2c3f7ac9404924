"""`hsd`: the one entry point.

train | cache | memory | generate | eval | lora | lab | lab-teacher | lab-worlds | ablate | random-model | random-scorers.

A user error (hsd.errors.HsdError: a bad config key or value, a missing or foreign file) prints one line,
`hsd: error: <message>`, and exits with status 2; `hsd --debug ...` or HSD_DEBUG=1 shows its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .names import DEFAULT_LAB_WORLD, LAB_WORLDS

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    """YAML paths and key=value overrides, in any order."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def cmd_train(args) -> None:
    from .config import load_config
    paths, overrides = _split(args.items)
    cfg = load_config(paths, overrides)  # before the trainer: a config error costs no training
    from .train import run
    print(run(cfg))


def cmd_cache(args) -> None:
    from .config import load_config
    from .data.cache import write_cache
    from .errors import ConfigError
    paths = [a for a in args.items if "=" not in a]
    if not paths:
        raise ConfigError("hsd cache needs a config file, e.g. hsd cache experiments/flux/tscd.yaml --out DIR")
    cfg = load_config(paths, [a for a in args.items if "=" in a])
    out = write_cache(cfg, args.out, None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    print(f"cached the data of {' '.join(paths)} in {out}: train with data.cache={out} (and data.shards and "
          f"data.folder unset)")


def cmd_memory(args) -> None:
    from .errors import ConfigError
    from .memory.stage import load_run, memory_report
    paths, overrides = _split(args.items)
    if not paths:
        raise ConfigError("hsd memory needs a config file, e.g. hsd memory experiments/sdxl/tscd.yaml")
    cfg = load_run(paths, overrides)
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpu_memory <= 0:
        raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}")
    if any(b < 1 for b in args.micro_batches or ()):
        raise ConfigError(f"--micro-batches must be at least 1, got {args.micro_batches}")
    gpus = args.gpus or cfg.trainer.devices * cfg.trainer.num_nodes
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    print(memory_report(cfg, paths, gpus, args.gpu_memory, args.micro_batches, not args.no_activations, log))


def cmd_lab(args) -> None:
    args.items = [str(EXPERIMENTS / "lab" / "hypersd.yaml"), *args.items]
    cmd_train(args)


def cmd_lab_teacher(args) -> None:
    from .errors import ConfigError
    from .io import check_output
    from .lab.teacher import fit_teacher, save_teacher, teacher_path
    from .lab.world import lab_world
    out = check_output(args.out or teacher_path(args.world), "--out (the teacher folder)",
                       replaces="world.safetensors")
    if min(args.steps, args.batch) < 1:
        raise ConfigError(f"--steps and --batch must be at least 1, got {args.steps} and {args.batch}")
    teacher = fit_teacher(lab_world(args.world), steps=args.steps, batch=args.batch, seed=args.seed)
    print(f"saved the lab teacher to {save_teacher(teacher, out)}")


def cmd_lab_worlds(args) -> None:
    from .errors import ConfigError
    from .lab.headroom import worlds_table
    if not args.guidance >= 0:
        raise ConfigError(f"--guidance must be >= 0 (1: no CFG), got {args.guidance:g}")
    print(worlds_table(args.guidance))


def cmd_ablate(args) -> None:
    from .ablate import ablate
    from .io import check_output
    paths, overrides = _split(args.items)
    check_output(args.out, "--out (the ablation folder)")
    print(ablate(paths, args.seeds, overrides, Path(args.out), args.summary_only))


def cmd_random_model(args) -> None:
    from .io import check_output
    from .models.components import ARCHS, ModelError, build_components
    from .models.dit import DIT_ARCHS, build_dit
    if args.arch not in {**ARCHS, **DIT_ARCHS}:
        raise ModelError(f"unknown architecture {args.arch!r}; known: {', '.join([*ARCHS, *DIT_ARCHS])}")
    check_output(args.out, "random-model OUT", replaces="model_index.json")
    if args.t5 and (args.arch not in DIT_ARCHS or DIT_ARCHS[args.arch].family != "sd3"):
        raise ModelError(f"--t5 adds SD3's optional T5 encoder (sd3, tiny-sd3), not to {args.arch}")
    parts = build_dit(args.arch, seed=args.seed, t5=args.t5) if args.arch in DIT_ARCHS else \
        build_components(args.arch, seed=args.seed)
    path = parts.save_pretrained(args.out)
    print(f"saved random-weight {args.arch} components to {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hsd", description="Hyper-SD training (TSCD, feedback, DMD) and the lab")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a user error instead of one line (also: HSD_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from YAML configs and key=value overrides")
    t.add_argument("items", nargs="+", metavar="CONFIG|key=value")
    t.set_defaults(fn=cmd_train)
    ca = sub.add_parser("cache", help="encode a run's data once (VAE latents, text conditioning) into webdataset "
                                      "shards with a manifest: data.cache=DIR then trains without the encoders")
    ca.add_argument("items", nargs="+", metavar="CONFIG|key=value")
    ca.add_argument("--out", required=True, metavar="DIR", help="the cache folder (written atomically)")
    ca.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ca.set_defaults(fn=cmd_cache)
    mem = sub.add_parser("memory", help="per-rank GPU memory of each stage of a config (no weights needed: the "
                                        "architecture on the meta device, activations traced with fake tensors)")
    mem.add_argument("items", nargs="+", metavar="CONFIG|key=value")
    mem.add_argument("--gpus", type=int, default=None,
                     help="total ranks (default: trainer.devices x trainer.num_nodes)")
    mem.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory of one GPU (default 80)")
    mem.add_argument("--micro-batches", type=int, nargs="+", default=None, metavar="N",
                     help="one table per micro-batch size per rank (replacing every stage's batch_size)")
    mem.add_argument("--no-activations", action="store_true",
                     help="weights, gradients and optimizer state only (seconds instead of minutes)")
    mem.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    mem.set_defaults(fn=cmd_memory)
    lab = sub.add_parser("lab", help="Hyper-SD on the lab world (TSCD 8->4->2->1, feedback, DMD) and its table "
                                     "(experiments/lab/hypersd.yaml)")
    lab.add_argument("items", nargs="*", metavar="key=value")
    lab.set_defaults(fn=cmd_lab)
    lt = sub.add_parser("lab-teacher", help="fit a lab world's teacher (UNet: eps; transformer: velocity) to the "
                                            "exact output and save it")
    lt.add_argument("--world", default=DEFAULT_LAB_WORLD, choices=list(LAB_WORLDS), help="the lab world to fit")
    lt.add_argument("--out", default=None, help="folder (default: the world's shipped one, hsd/lab/teachers/WORLD)")
    lt.add_argument("--steps", type=int, default=4000)
    lt.add_argument("--batch", type=int, default=128)
    lt.add_argument("--seed", type=int, default=0)
    lt.set_defaults(fn=cmd_lab_teacher)
    lw = sub.add_parser("lab-worlds", help="list the lab worlds with their headroom (exact-score few-step error)")
    lw.add_argument("--guidance", type=float, default=3.0, help="CFG scale of the sampler and the exact ODE")
    lw.set_defaults(fn=cmd_lab_worlds)
    ab = sub.add_parser("ablate", help="run configs over seeds; compare each arm with the first, paired by seed "
                                       "(t-test, false-discovery rate controlled)")
    ab.add_argument("items", nargs="+", metavar="CONFIG|key=value")
    ab.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ab.add_argument("--out", default="runs/ablation")
    ab.add_argument("--summary-only", action="store_true",
                    help="only summarise the tables already in --out (arms run as separate calls)")
    ab.set_defaults(fn=cmd_ablate)
    rm = sub.add_parser("random-model", help="save random-weight components of an architecture (tests, benchmarks)")
    rm.add_argument("arch", help="sd15 | sdxl | sd3 | flux (the real architectures) | tiny-sd15 | tiny-sdxl | "
                                 "tiny-sd3 | tiny-flux")
    rm.add_argument("out")
    rm.add_argument("--seed", type=int, default=0)
    rm.add_argument("--t5", action="store_true", help="SD3: also write its optional T5 encoder (text_encoder_3)")
    rm.set_defaults(fn=cmd_random_model)
    from eval.cli import add_eval_commands

    from .lora_cli import add_lora_commands
    from .pipelines.generate import add_generate_command
    add_generate_command(sub)
    add_lora_commands(sub)
    add_eval_commands(sub)
    args = p.parse_args(argv)
    from .errors import run_guarded
    run_guarded(lambda: args.fn(args), "hsd", args.debug)  # a user error: one line, exit status 2


if __name__ == "__main__":
    main()
