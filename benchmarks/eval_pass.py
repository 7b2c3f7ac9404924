"""All four metrics over N images: hsd's one pass vs. the four reference implementations run one after another.

Same random-weight models on both sides (the official layouts, from `hsd random-scorers`), same PNGs on disk,
model loading excluded from both timings. The references, each decoding and preprocessing on its own:
  CLIP         torchmetrics' CLIPScore (its update over batches), given our open_clip model and open_clip's
               preprocessing as the model/processor pair
  ImageReward  the image-reward package's `score(prompt, path)` loop, in the pinned reference environment
               (scripts/imagereward_reference.sh), timed there
  PickScore    the PickScore README's code (processor -> features -> exp(logit_scale) * cos), one call per image
  Aes          the improved-aesthetic-predictor snippet (preprocess, encode_image, numpy L2 norm, MLP), per image
Ours: `eval.run.evaluate_spec` on the same PNGs: decode once, one crop, batched scorers, scores appended.

    .venv/bin/python benchmarks/eval_pass.py --size real --n 16          # real architectures (~8 GB of files)
    .venv/bin/python benchmarks/eval_pass.py --size tiny --n 8 --no-imagereward-reference   # smoke
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from eval.run import Item, ModelSpec, Store, evaluate_spec, item_key, weights_fingerprint
from hsd.scorers.clip import TransformersStyleClip
from hsd.scorers.imagereward_weights import synthetic_image
from hsd.scorers.random_weights import write_random_scorers
from hsd.scorers.scorers import METRICS, load_scorers

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ["A man riding a wave on top of a surfboard.", "A kitchen with wooden cabinets and a white stove.",
            "Two giraffes standing next to each other in a field.", "A plate of food with broccoli and rice.",
            "A red double decker bus driving down a city street.", "A cat sleeping on a laptop keyboard."]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def reference_clip(scorers, jobs, batch):
    import open_clip
    from torchmetrics.multimodal.clip_score import CLIPScore
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
    tokenizer = open_clip.get_tokenizer("ViT-B-32-quickgelu")

    def processor(images=None, text=None, **_):
        if images is not None:
            return {"pixel_values": torch.stack([preprocess(to_pil_image(i)) for i in images])}
        ids = tokenizer(text)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    metric = CLIPScore(model_name_or_path=lambda: (TransformersStyleClip(scorers["CLIP"].model), processor))
    for k in range(0, len(jobs), batch):
        chunk = jobs[k:k + batch]
        metric.update([pil_to_tensor(Image.open(p).convert("RGB")) for p, _ in chunk], [c for _, c in chunk])
    return [metric.compute().item()]


def reference_pickscore(scorers, jobs, weights):
    from transformers import AutoProcessor
    model = scorers["PickScore"].model
    processor = AutoProcessor.from_pretrained(weights / "pickscore" / "processor")
    scores = []
    for path, prompt in jobs:
        image_inputs = processor(images=[Image.open(path)], padding=True, truncation=True, max_length=77,
                                 return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs).pooler_output   # transformers 5: an output object
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs).pooler_output
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores.append((model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).item())
    return scores


def reference_aesthetic(scorers, jobs):
    import open_clip
    clip_model, head = scorers["Aes"].model, scorers["Aes"].head
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14-quickgelu", pretrained=None)
    scores = []
    for path, _ in jobs:
        image = preprocess(Image.open(path)).unsqueeze(0)
        features = clip_model.encode_image(image).numpy()
        normed = features / np.linalg.norm(features, 2, -1, keepdims=True)
        scores.append(head(torch.from_numpy(normed).float()).item())
    return scores


def reference_imagereward(weights: Path, jobs, env: Path, threads: int):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[str(p), c] for p, c in jobs], f)
    r = subprocess.run([str(env / "bin" / "python"), str(ROOT / "benchmarks" / "imagereward_loop.py"),
                        str(weights), f.name], capture_output=True, text=True,
                       env={"BENCH_THREADS": str(threads), "PATH": "/usr/bin:/bin"})
    if r.returncode:
        raise SystemExit(f"the image-reward reference loop failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["seconds"], out["scores"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "real"), default="real")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=Path, help="default: .cache/bench-scorers-SIZE (written once)")
    p.add_argument("--reference-env", type=Path, default=ROOT / ".cache" / "ir-ref-venv")
    p.add_argument("--no-imagereward-reference", action="store_true", help="compare CLIP, Aes, PickScore only")
    return p


def prepare(args, device: str = "cpu") -> SimpleNamespace:
    """The scorers (written once to the weights folder, loaded on `device`) and N synthetic PNGs in a fresh store."""
    weights = args.weights or ROOT / ".cache" / f"bench-scorers-{args.size}"
    if not (weights / "pickscore" / "model").exists():
        print(f"writing random-weight {args.size} scorers to {weights} ...", flush=True)
        write_random_scorers(weights, args.size)
    metrics = tuple(m for m in METRICS if not (args.no_imagereward_reference and m == "ImageReward"))
    scorers = load_scorers(weights, metrics, device)
    out = Path(tempfile.mkdtemp())
    spec = ModelSpec(name="bench", model="(images on disk)", steps=1)
    fingerprint = weights_fingerprint(weights, metrics)
    store = Store(out, spec, fingerprint)
    prompts = [CAPTIONS[i % len(CAPTIONS)] + f" #{i}" for i in range(args.n)]
    items = [Item(i, prompts[i], i, item_key(i, prompts[i], i)) for i in range(args.n)]   # seed i, as the pass
    for it in items:
        Image.fromarray(synthetic_image(it.i, args.image_size, args.image_size).numpy()).save(store.png(it))
    return SimpleNamespace(weights=weights, scorers=scorers, out=out, spec=spec, fingerprint=fingerprint,
                           prompts=prompts, items=items, jobs=[(store.png(it), it.prompt) for it in items])


def hsd_pass(b: SimpleNamespace, batch: int, device: str = "cpu"):
    """(seconds, summary) of hsd's one pass (decode once, one crop, batched scorers) over the prepared PNGs."""
    return timed(lambda: evaluate_spec(b.spec, b.prompts, b.scorers, b.out, b.fingerprint, 0, batch, device))


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    b = prepare(args)
    scorers, weights, jobs, spec, fingerprint, out = b.scorers, b.weights, b.jobs, b.spec, b.fingerprint, b.out
    items = b.items
    t_ours, summary = hsd_pass(b, args.batch)
    stored = Store(out, spec, fingerprint).records
    records = [stored[it.key] for it in items]
    rows = []
    t, clip_mean = timed(lambda: reference_clip(scorers, jobs, args.batch))
    rows.append(("CLIP (torchmetrics CLIPScore)", t, abs(clip_mean[0] - summary.scores["CLIP"])))
    t, aes = timed(lambda: reference_aesthetic(scorers, jobs))
    rows.append(("Aes (predictor snippet)", t, max(abs(a - r["Aes"]) for a, r in zip(aes, records))))
    t, pick = timed(lambda: reference_pickscore(scorers, jobs, weights))
    scale = scorers["PickScore"].scale         # compared as cosines: the raw score is exp(logit_scale) times it
    rows.append(("PickScore (README code)", t, max(abs(a / scale - r["PickScore"]) for a, r in zip(pick, records))))
    if not args.no_imagereward_reference:
        t, ir = reference_imagereward(weights, jobs, args.reference_env, args.threads)
        rows.append(("ImageReward (package loop)", t, max(abs(a - r["ImageReward"]) for a, r in zip(ir, records))))
    t_ref = sum(t for _, t, _ in rows)
    print(f"{args.n} images of {args.image_size}px, {args.size} scorers, {args.threads} threads, batch {args.batch}")
    print("| reference | seconds | max abs diff to ours |\n|---|---|---|")
    for name, t, diff in rows:
        print(f"| {name} | {t:.2f} | {diff:.2e} |")
    print(f"| all references | {t_ref:.2f} | |\n| hsd one pass ({len(rows)} metrics) | {t_ours:.2f} | |")
    print(f"speed-up of the one pass over the references: ratio {t_ref / t_ours:.2f}")


if __name__ == "__main__":
    main()
