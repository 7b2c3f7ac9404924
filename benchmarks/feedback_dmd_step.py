"""Step time and peak memory of the feedback and DMD stages (issue 5's GPU measurement), on random-weight
components of a registered architecture, through the real LightningModules and Lightning's Trainer.

    python benchmarks/feedback_dmd_step.py --arch sd15 --resolution 512 --scorers-size real --device cuda \
        --frozen-dtype bfloat16

The feedback step decodes x'_0 with the VAE and runs the aesthetic predictor and ImageReward (random weights in
the official layouts) and SOLO R50-FPN on a noised COCO-like image; the DMD step is one generator update plus
`--fake-updates` fake-score updates (fake score as a LoRA). On a CPU (`--arch tiny-sd15`) it is a smoke test.
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


def fixtures(root: Path, size: str) -> list[str]:
    """Random scorers, a random SOLO checkpoint, a one-image COCO instances file and its captions; their overrides."""
    from hsd.rewards.instance import build_solo
    from hsd.scorers.random_weights import write_random_scorers
    write_random_scorers(root / "scorers", size)
    save_file(build_solo(80).state_dict(), root / "solo.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(root / "1.jpg")
    (root / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "height": 480, "width": 640}], "categories": [{"id": 1}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [100, 100, 200, 150],
                         "segmentation": [[100, 100, 300, 100, 300, 250, 100, 250]]}]}))
    (root / "captions.json").write_text(json.dumps({"annotations": [{"id": 1, "image_id": 1, "caption": "a box"}]}))
    return [f"feedback.scorers={root / 'scorers'}", f"feedback.solo={root / 'solo.safetensors'}",
            f"feedback.coco_annotations={root / 'instances.json'}", f"feedback.coco_images={root}",
            f"feedback.coco_captions={root / 'captions.json'}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tiny-sd15")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--scorers-size", default="tiny", choices=["tiny", "real"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--frozen-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the frozen UNet/text weights (bfloat16 on a GPU, as the SD recipes train)")
    p.add_argument("--fake-updates", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    from hsd.worlds import SD
    work = Path(tempfile.mkdtemp())
    comps = build_components(args.arch)
    world = args.arch.split("-")[-1]
    model = comps.save_pretrained(work / "model")
    (work / "images").mkdir()  # the world opens its data source when it is made; the stages here draw none
    Image.new("RGB", (64, 64)).save(work / "images" / "0.png")
    cfg = load_config([], [f"world={world}", f"model.path={model}", f"data.folder={work / 'images'}",
                           f"model.resolution={args.resolution}", *fixtures(work, args.scorers_size),
                           "feedback.rewards={Aes: {margin: 10.0}, ImageReward: {margin: 3.0}}",
                           f"model.frozen_dtype={args.frozen_dtype}", f"trainer.precision={args.precision}",
                           "feedback.instance_weight=1.0", "feedback.steps=8", "feedback.iterations=1",
                           f"dmd.fake_updates={args.fake_updates}", "dmd.w_feedback=0.0"])
    sd = SD(cfg)
    torch.manual_seed(0)
    lio.attach_lora(sd.unet, 64, 64)
    lio.add_adapter(sd.unet, "feedback", 64, 64)
    lio.add_adapter(sd.unet, "fake", 64, 64)
    for prm in lio.lora_params(sd.unet).values():  # LoRAs train in fp32 over bf16 frozen weights
        prm.data = prm.data.float()

    def batch(i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"pixels": torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1,
                "captions": ["a photograph of an astronaut riding a horse"] * args.batch}

    print(f"{args.arch} at {args.resolution}px, batch {args.batch}, {args.precision}, LoRA rank 64, "
          f"{args.scorers_size} scorers, device {args.device}")
    print("| stage | s/step | peak GiB |\n|---|---|---|")
    stages = {"feedback (Aes + ImageReward + SOLO)": lambda: FeedbackModule(
                  sd.unet, sd.schedule, cfg.feedback, sd.feedback_loss(), encoder=sd.encoder),
              f"DMD (1 generator + {args.fake_updates} fake updates)": lambda: DMDModule(
                  sd.unet, sd.schedule, cfg.dmd, None, encoder=sd.encoder)}
    for name, make in stages.items():
        sec, peak = timed_fit(make(), args, batch)
        print(f"| {name} | {sec:.3f} | {'n/a (CPU)' if peak is None else f'{peak:.1f}'} |", flush=True)


if __name__ == "__main__":
    main()
