"""Step time and peak memory of the feedback and DMD stages (issue 5's GPU measurement), on random-weight
components of a registered architecture, through the real LightningModules and Lightning's Trainer.

    python benchmarks/feedback_dmd_step.py --arch sd15 --resolution 512 --scorers-size real --device cuda \
        --frozen-dtype bfloat16

The feedback step decodes x'_0 with the VAE and runs the aesthetic predictor and ImageReward (random weights in
the official layouts) and SOLO R50-FPN on a noised COCO-like image; the DMD step is one generator update plus
`--fake-updates` fake-score updates (fake score as a LoRA). On a CPU (`--arch tiny-sd15`) it is a smoke test.
benchmarks/gpu_check.py runs its feedback stage alone (`--stages feedback`, `--scorers DIR` shared with the eval
measurement, `--build-device cuda`, `--no-instance` where mmdet does not import).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from sd_train_memory import timed_fit

from hsd.config import load_config
from hsd.lit.dmd import DMDModule
from hsd.lit.feedback import FeedbackModule
from hsd.models import lora as lio
from hsd.models.components import build_components


def fixtures(root: Path, size: str, scorers: Path | None = None, instance: bool = True) -> list[str]:
    """Random scorers (written to `scorers` unless it holds them already), with `instance` a random SOLO checkpoint,
    a one-image COCO instances file and its captions; their overrides."""
    from hsd.scorers.random_weights import write_random_scorers
    scorers = scorers or root / "scorers"
    if not (scorers / "pickscore" / "model").exists():
        write_random_scorers(scorers, size)
    if not instance:
        return [f"feedback.scorers={scorers}", "feedback.instance_weight=0.0"]
    from hsd.rewards.instance import build_solo
    save_file(build_solo(80).state_dict(), root / "solo.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(root / "1.jpg")
    (root / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "height": 480, "width": 640}], "categories": [{"id": 1}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [100, 100, 200, 150],
                         "segmentation": [[100, 100, 300, 100, 300, 250, 100, 250]]}]}))
    (root / "captions.json").write_text(json.dumps({"annotations": [{"id": 1, "image_id": 1, "caption": "a box"}]}))
    return [f"feedback.scorers={scorers}", f"feedback.solo={root / 'solo.safetensors'}",
            f"feedback.coco_annotations={root / 'instances.json'}", f"feedback.coco_images={root}",
            f"feedback.coco_captions={root / 'captions.json'}", "feedback.instance_weight=1.0"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tiny-sd15")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--scorers-size", default="tiny", choices=["tiny", "real"])
    p.add_argument("--scorers", type=Path, help="a random-scorer folder to reuse (written there if empty)")
    p.add_argument("--no-instance", action="store_true", help="feedback without the SOLO instance term (no mmdet)")
    p.add_argument("--stages", nargs="+", default=["feedback", "dmd"], choices=["feedback", "dmd"])
    p.add_argument("--build-device", default="cpu", help="where the random components are drawn (cuda: faster)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--frozen-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the frozen UNet/text weights (bfloat16 on a GPU, as the SD recipes train)")
    p.add_argument("--fake-updates", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    return p


def build(args):
    """The SD world over random components saved to a temporary folder, with its config and three rank-64 LoRAs."""
    from hsd.worlds import SD
    from hsd.worlds.sd import one_batch
    work = Path(tempfile.mkdtemp())
    with torch.device(args.build_device):
        comps = build_components(args.arch)
    world = args.arch.split("-")[-1]
    model = comps.save_pretrained(work / "model")
    del comps
    cfg = load_config([], [f"world={world}", f"model.path={model}", f"data.folder={work / 'images'}",
                           f"model.resolution={args.resolution}",
                           *fixtures(work, args.scorers_size, args.scorers, not args.no_instance),
                           "feedback.rewards={Aes: {margin: 10.0}, ImageReward: {margin: 3.0}}",
                           f"model.frozen_dtype={args.frozen_dtype}", f"trainer.precision={args.precision}",
                           "feedback.steps=8", "feedback.iterations=1",
                           f"dmd.fake_updates={args.fake_updates}", "dmd.w_feedback=0.0"])
    (work / "images").mkdir()  # the world checks its data holds one batch when it is made; the stages here draw none
    for i in range(one_batch(cfg)[0]):
        Image.new("RGB", (64, 64)).save(work / "images" / f"{i}.png")
        (work / "images" / f"{i}.txt").write_text("a photo")
    sd = SD(cfg)
    torch.manual_seed(0)
    lio.attach_lora(sd.unet, 64, 64)
    lio.add_adapter(sd.unet, "feedback", 64, 64)
    lio.add_adapter(sd.unet, "fake", 64, 64)
    for prm in lio.lora_params(sd.unet).values():  # LoRAs train in fp32 over bf16 frozen weights
        prm.data = prm.data.float()
    return sd, cfg


def stages(sd, cfg, args) -> dict:
    """{row name: a function making the stage's module}, for the stages in `args.stages`."""
    instance = " + SOLO" if cfg.feedback.instance_weight else ""
    made = {f"feedback (Aes + ImageReward{instance})": lambda: FeedbackModule(
                sd.unet, sd.schedule, cfg.feedback, sd.feedback_loss(), encoder=sd.encoder),
            f"DMD (1 generator + {args.fake_updates} fake updates)": lambda: DMDModule(
                sd.unet, sd.schedule, cfg.dmd, None, encoder=sd.encoder)}
    return {name: make for (name, make), kind in zip(made.items(), ("feedback", "dmd")) if kind in args.stages}


def batches(args):
    def batch(i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"pixels": torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1,
                "captions": ["a photograph of an astronaut riding a horse"] * args.batch}
    return batch


def main() -> None:
    args = parser().parse_args()
    sd, cfg = build(args)
    print(f"{args.arch} at {args.resolution}px, batch {args.batch}, {args.precision}, LoRA rank 64, "
          f"{args.scorers_size} scorers, device {args.device}")
    print("| stage | s/step | peak GiB |\n|---|---|---|")
    for name, make in stages(sd, cfg, args).items():
        sec, peak = timed_fit(make(), args, batches(args))
        print(f"| {name} | {sec:.3f} | {'n/a (CPU)' if peak is None else f'{peak:.1f}'} |", flush=True)


if __name__ == "__main__":
    main()
