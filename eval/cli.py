"""`hsd eval` (also `python -m eval`): generate -> score -> the paper's table, resumable.

torch and the models are imported inside the command, so `hsd --help` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hsd.errors import ConfigError, run_guarded

METRIC_NAMES = ("CLIP", "Aes", "ImageReward", "PickScore")   # = hsd.scorers.scorers.METRICS, without torch


def specs_from_args(args) -> list:
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from hsd.io import check_input

    from .run import ModelSpec
    if args.spec:
        specs = []
        for path in args.spec:
            check_input(path, "model spec file", "a YAML file with a 'specs:' list (docs/eval.md)")
            try:
                data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
            except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as e:
                raise ConfigError(f"{path}: not a YAML file: {' '.join(str(e).split())}") from e
            if not isinstance(data, dict) or not isinstance(data.get("specs"), list):
                raise ConfigError(f"{path}: expected a 'specs:' list of model specs")
            specs += [ModelSpec.from_dict(d) for d in data["specs"]]
        return specs
    if not args.model:
        raise ConfigError("give --spec FILE.yaml or --model FOLDER (with --steps)")
    return [ModelSpec(name=args.name or Path(args.model).name, model=args.model, steps=steps,
                      scheduler=args.scheduler, guidance=args.guidance, lora=tuple(args.lora), unet=args.unet,
                      eta=args.eta, dtype=args.dtype, size=args.size, paper=args.paper, t5=args.t5)
            for steps in args.steps]


def check_input_files(args, specs) -> None:
    """The scorer weights and every spec's files, before the first image: a later spec's typo costs no generation."""
    from hsd.io import check_input
    check_input(args.weights, "scorer weights folder", "the layout in docs/eval.md, e.g. from hsd random-scorers",
                "folder")
    for spec in specs:
        check_input(spec.model, f"model of spec {spec.name!r}",
                    "a diffusers pipeline folder (SD1.5, SDXL, SD3 or FLUX.1)", "folder")
        for path, _ in spec.lora:
            check_input(path, f"LoRA file of spec {spec.name!r}", "a .safetensors LoRA file (diffusers or kohya)")
        if spec.unet:
            check_input(spec.unet, f"UNet of spec {spec.name!r}", "a diffusers UNet folder or a .safetensors file",
                        "any")


def prompts_from_args(args) -> list[str]:
    from hsd.pipelines.generate import read_prompts

    from .coco import coco5k
    if args.coco:
        path, sha, n = coco5k(args.coco, args.out / "coco5k.txt")
        print(f"COCO-5k: {n} prompts in {path} (sha256 {sha})")
        prompts = read_prompts(path)
    else:
        prompts = read_prompts(args.prompts)
    return prompts[:args.limit] if args.limit else prompts


def cmd_eval(args) -> None:
    """User errors (hsd.errors.HsdError) propagate to the caller's one handler: hsd's CLI or `main` below."""
    from hsd.io import check_output, is_main_process, remove_stale_temps

    from .coco import prompts_sha256
    from .run import run_eval
    from .table import markdown, rows
    check_output(args.out, "--out (the eval run folder)")
    if is_main_process():  # the writes a killed eval left unfinished (tables, images), before this one writes
        remove_stale_temps(args.out)
    specs = specs_from_args(args)
    check_input_files(args, specs)
    prompts = prompts_from_args(args)
    summaries = run_eval(specs, prompts, args.weights, args.out, tuple(args.metrics), args.seed,
                         args.batch_size, args.device)
    print(markdown(rows(summaries), prompts_sha256(prompts), args.seed))
    print(f"tables written to {args.out}/table.{{md,csv,json}}")


def cmd_random_scorers(args) -> None:
    from hsd.io import check_output
    from hsd.scorers.random_weights import write_random_scorers
    check_output(args.out, "random-scorers OUT")
    print(f"wrote random-weight {args.size} scorers to {write_random_scorers(args.out, args.size, args.seed)}")


def eval_arguments(e: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from hsd.pipelines.generate import DTYPES, SCHEDULERS, parse_lora, positive_int
    e.add_argument("--weights", type=Path, required=True, help="scorer weights folder (layout: docs/eval.md)")
    e.add_argument("--metrics", nargs="+", choices=METRIC_NAMES, default=list(METRIC_NAMES))
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco", type=Path, metavar="JSON", help="captions_val2017.json: COCO-5k prompts")
    src.add_argument("--prompts", type=Path, metavar="FILE", help="text file, one prompt per line")
    e.add_argument("--limit", type=positive_int, help="only the first N prompts")
    e.add_argument("--spec", type=Path, nargs="+", help="YAML file(s) with a 'specs:' list (one table row each)")
    e.add_argument("--model", help="diffusers folder (instead of --spec)")
    e.add_argument("--name", help="row label (default: the model folder's name)")
    e.add_argument("--paper", help="paper row to compare with, e.g. Hyper-SD15 (default: --name)")
    e.add_argument("--lora", type=parse_lora, nargs="+", action="extend", default=[], metavar="FILE[:WEIGHT]")
    e.add_argument("--unet", help="UNet folder or .safetensors replacing the model's")
    e.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    e.add_argument("--eta", type=float)
    e.add_argument("--steps", type=positive_int, nargs="+", default=[1], help="one row per step count")
    e.add_argument("--guidance", type=float, help="CFG scale (default 0: none); on FLUX.1 its embedded guidance "
                                                  "(default 3.5)")
    e.add_argument("--dtype", choices=DTYPES, default="float32")
    e.add_argument("--t5", action="store_true", help="SD3: with the folder's T5 encoder (as hsd generate --t5)")
    e.add_argument("--size", type=int, help="image side (default: the model's native size)")
    e.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", type=Path, required=True, help="run folder: images, scores, tables")
    e.set_defaults(fn=cmd_eval)
    return e


def add_eval_commands(subparsers) -> None:
    eval_arguments(subparsers.add_parser("eval", help="generate over COCO-5k (or any prompts), score CLIP, Aes, "
                                                      "ImageReward and PickScore, print the paper's table; resumable"))
    r = subparsers.add_parser("random-scorers", help="write random-weight scorer files in the official layouts "
                                                     "(tests, benchmarks, the notebook)")
    r.add_argument("out", type=Path)
    r.add_argument("--size", choices=("tiny", "real"), default="tiny",
                   help="tiny: narrow models; real: the real architectures (several GB)")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(fn=cmd_random_scorers)


def main(argv: list[str] | None = None) -> None:
    """`python -m eval` takes `hsd eval`'s arguments; a user error prints one line and exits with status 2
    (HSD_DEBUG=1 shows the traceback)."""
    prog = "python -m eval"
    args = eval_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0]))
    args = args.parse_args(argv)
    run_guarded(lambda: args.fn(args), prog)
