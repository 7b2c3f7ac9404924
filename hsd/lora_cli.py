"""`hsd lora merge|convert|info`: LoRA files for the tools people use (diffusers, ComfyUI, A1111, kohya)."""
from __future__ import annotations

import json
from pathlib import Path

from .pipelines.generate import parse_lora

FORMATS = ("diffusers", "kohya")  # = lora_formats.FORMATS; torch and peft load only when a command runs


def add_lora_commands(subparsers) -> None:
    lora = subparsers.add_parser("lora", help="merge, convert or inspect LoRA files (diffusers or kohya layout)")
    sub = lora.add_subparsers(dest="lora_command", required=True)

    merge = sub.add_parser("merge", help="combine LoRAs at weights into one exact LoRA file, or fuse them into a UNet")
    merge.add_argument("inputs", nargs="+", type=parse_lora, metavar="FILE:WEIGHT",
                       help="LoRA file and its weight (default 1), e.g. Hyper-SD15-8steps-lora.safetensors:0.8")
    merge.add_argument("--out", required=True, type=Path, help="LoRA file, or with --unet the fused UNet folder")
    merge.add_argument("--format", choices=FORMATS, default="kohya", help="layout of the merged LoRA file (no --unet)")
    merge.add_argument("--unet", type=Path, metavar="MODEL_DIR",
                       help="diffusers UNet folder (or pipeline folder with unet/) to fuse the LoRAs into")
    merge.set_defaults(fn=run_merge)

    convert = sub.add_parser("convert", help="rewrite a LoRA file in another layout")
    convert.add_argument("input", type=Path)
    convert.add_argument("--out", required=True, type=Path)
    convert.add_argument("--format", choices=FORMATS, required=True)
    convert.set_defaults(fn=run_convert)

    info = sub.add_parser("info", help="print a LoRA file's layout, ranks, alphas, module count and metadata")
    info.add_argument("file", type=Path)
    info.set_defaults(fn=run_info)


def run_convert(args) -> None:
    from .io import check_output
    from .models.lora_formats import convert_lora
    check_output(args.out, "--out (the converted LoRA file)", "file")
    print(convert_lora(args.input, args.out, args.format))


def run_info(args) -> None:
    from .models.lora_formats import lora_summary
    print(format_summary(lora_summary(args.file)))


def run_merge(args) -> None:
    from .io import check_output
    from .models.lora_formats import merge_loras
    paths, weights = [p for p, _ in args.inputs], [w for _, w in args.inputs]
    check_output(args.out, "--out (the merged LoRA file)" if args.unet is None else "--out (the fused UNet folder)",
                 "file" if args.unet is None else "folder", "" if args.unet is None else "config.json")
    if args.unet is None:
        print(merge_loras(paths, weights, args.out, args.format))
        return
    from .models.lora import fuse_loras  # torch/diffusers model code only for fusing

    unet = load_unet(args.unet)
    fuse_loras(unet, paths, weights)
    from .io import atomic_dir
    with atomic_dir(args.out) as tmp:  # a failed or killed write keeps the previous folder
        unet.save_pretrained(tmp)
    print(args.out)


def load_unet(model_dir: Path):
    from diffusers import UNet2DConditionModel

    from .models.components import loading
    for folder, subfolder in ((model_dir / "unet", "unet"), (model_dir, None)):
        if (folder / "config.json").is_file():
            with loading("a UNet", folder):
                return UNet2DConditionModel.from_pretrained(model_dir, subfolder=subfolder)
    from .errors import MissingFileError
    raise MissingFileError(f"{model_dir} is neither a diffusers UNet folder (config.json) nor a pipeline folder "
                            f"(unet/config.json)")


def format_summary(summary: dict, width: int = 200) -> str:
    """Readable lines; long metadata values (diffusers' LoraConfig JSON lists every module) are cut at `width`."""
    meta = {k: v if len(v) <= width else f"{v[:width]}... ({len(v)} chars)" for k, v in summary["metadata"].items()}
    rows = [("file", summary["file"]), ("format", summary["format"]), ("modules", summary["modules"]),
            ("rank", ", ".join(map(str, summary["ranks"]))), ("alpha", ", ".join(f"{a:g}" for a in summary["alphas"])),
            ("metadata", json.dumps(meta, indent=2, sort_keys=True))]
    return "\n".join(f"{k}: {v}" for k, v in rows)
