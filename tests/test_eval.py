"""The eval package: scorers against their reference implementations, COCO-5k, the resumable pass, errors.

Random weights in the official layouts stand in for the checkpoints (no hub here); CLIP runs at its real
architecture, the others at real layouts with few layers (the real sizes run in benchmarks/eval_pass.py).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from eval.coco import coco5k, coco_captions, prompts_sha256
from eval.run import ModelSpec, run_eval
from hsd.scorers import clip
from hsd.scorers.images import check_unit, crop224, normalize, to_unit
from hsd.scorers.random_weights import write_random_scorers
from hsd.scorers.scorers import AES_HEAD, ClipScorer, load_scorers, score_batch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, highly detailed",
           "red car", "a bowl of fruit on a wooden table", "two dogs playing in the snow"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_scorers(tmp_path_factory.mktemp("scorers"), "tiny", seed=0)


def _images(n, size=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 8, 8, generator=g)
    big = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")
    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in big]


def test_pixels_must_be_unit_floats():
    x = torch.rand(2, 3, 224, 224)
    assert check_unit(x) is x
    for bad, word in [((x * 255).byte(), "float"), (x * 255, "[0, 1]"), (x * 2 - 1, "[0, 1]"),
                      (x[:, :1], "(B, 3, H, W)")]:
        with pytest.raises(ValueError, match=re.escape(word)):
            normalize(bad)
    with pytest.raises(ValueError, match="uint8"):
        to_unit(x)


def test_crop_matches_open_clip_preprocess():
    """Our shared crop + normalisation is open_clip's OpenAI preprocessing (resize, crop, normalise)."""
    import open_clip
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
    for image in [_images(1, 300)[0], _images(1, 256)[0].resize((320, 200))]:
        ours = normalize(to_unit(crop224(image)[None]))
        assert torch.allclose(ours, preprocess(image)[None], atol=1e-5)


def _processor(images=None, text=None, **_):
    if images is not None:
        from torchvision.transforms.functional import to_pil_image
        return {"pixel_values": normalize(to_unit(torch.stack([crop224(to_pil_image(i)) for i in images])))}
    return {"input_ids": clip.tokenize(text), "attention_mask": torch.ones(len(text), 77, dtype=torch.long)}


def test_clip_score_equals_torchmetrics(tmp_path):
    """Real ViT-B/32-quickgelu, random weights: our batched score == torchmetrics' CLIPScore to 1e-4."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    model = clip.build_clip("ViT-B-32-quickgelu", seed=0)
    clip.save_clip(model, "ViT-B-32-quickgelu", tmp_path / "clip")
    scorer = ClipScorer(clip.load_clip(tmp_path / "clip", "ViT-B-32-quickgelu", "CLIP"))
    images = _images(len(PROMPTS))
    crops = torch.stack([crop224(im) for im in images])
    ours = scorer(to_unit(crops), PROMPTS)
    metric = CLIPScore(model_name_or_path=lambda: (clip.TransformersStyleClip(model), _processor))
    metric.update([pil_to_tensor(im) for im in images], PROMPTS)
    assert abs(max(ours.mean().item(), 0) - metric.compute().item()) < 1e-4
    assert ours.std() > 0.1                       # the scores differ between images: the check is not vacuous


def test_clip_truncation_keeps_end_of_text_last():
    tokens = clip.tokenize(["word " * 200, "short"])
    eot = 49407
    assert tokens.shape == (2, 77) and tokens[0, -1] == eot and (tokens[0] == eot).sum() == 1
    assert tokens[1, 2] == eot and tokens[1, 3:].eq(0).all()


def test_aesthetic_head_official_keys_and_direct_formula(weights):
    state = torch.load(weights / "aesthetic" / AES_HEAD, weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    scorer = load_scorers(weights, ("Aes",))["Aes"]
    pixels = to_unit(torch.stack([crop224(im) for im in _images(3)]))
    emb = scorer.model.encode_image(normalize(pixels))
    x = emb / emb.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):                     # no activations between the linears
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert torch.allclose(scorer(pixels), x.squeeze(-1), atol=1e-6)


def test_pickscore_equals_readme_formula(weights):
    """The PickScore README: processor -> get_*_features -> normalise -> exp(logit_scale) * text @ image.T."""
    from transformers import AutoProcessor, CLIPModel
    folder = weights / "pickscore"
    model = CLIPModel.from_pretrained(folder / "model").eval()
    processor = AutoProcessor.from_pretrained(folder / "processor")
    images, prompt = _images(3, size=448), PROMPTS[1]
    with torch.no_grad():
        image_inputs = processor(images=images, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs)
        text_embs = model.get_text_features(**text_inputs)
        # transformers 5 returns model outputs where the README's transformers 4 returned tensors
        image_embs, text_embs = (getattr(e, "pooler_output", e) for e in (image_embs, text_embs))
        image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        readme = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
    scorer = load_scorers(weights, ("PickScore",))["PickScore"]
    pixels = to_unit(torch.stack([crop224(im) for im in images]))
    values = score_batch({"PickScore": scorer}, pixels, [prompt] * 3)
    assert torch.allclose(torch.tensor(values["PickScore_raw"]), readme, atol=1e-4)
    assert torch.allclose(torch.tensor(values["PickScore"]) * model.logit_scale.exp(), readme, atol=1e-4)


def test_scorers_are_differentiable(weights):
    scorers = load_scorers(weights)
    pixels = torch.rand(2, 3, 224, 224, requires_grad=True)
    total = sum(s(pixels, PROMPTS[:2]).sum() for s in scorers.values())
    total.backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()


def test_missing_checkpoint_names_metric_and_files(weights, tmp_path):
    import shutil
    broken = tmp_path / "w"
    shutil.copytree(weights, broken)
    for metric, victim, expected in [("Aes", "aesthetic/" + AES_HEAD, AES_HEAD),
                                     ("CLIP", "clip/open_clip_model.safetensors", "open_clip_config.json"),
                                     ("PickScore", "pickscore/model", "PickScore_v1"),
                                     ("ImageReward", "imagereward/ImageReward.pt", "ImageReward.pt")]:
        path = broken / victim
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        with pytest.raises(FileNotFoundError, match=f"{metric}.*{expected}".replace("+", r"\+")):
            load_scorers(broken, (metric,))
    with pytest.raises(FileNotFoundError, match="scorer weights folder"):
        load_scorers(tmp_path / "nowhere")


def _coco(tmp_path):
    data = {"images": [{"id": i} for i in (42, 7, 19)],
            "annotations": [{"id": 900, "image_id": 42, "caption": "a later caption"},
                            {"id": 5, "image_id": 42, "caption": "  A dog\non a   couch. "},
                            {"id": 3, "image_id": 7, "caption": "Two cats."},
                            {"id": 11, "image_id": 19, "caption": "A tram in the rain"},
                            {"id": 2, "image_id": 19, "caption": "First tram caption"}]}
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    return path


def test_coco5k_rule_and_hash(tmp_path):
    pairs = coco_captions(_coco(tmp_path))
    assert pairs == [(7, "Two cats."), (19, "First tram caption"), (42, "A dog on a couch.")]
    path, sha, n = coco5k(_coco(tmp_path), tmp_path / "coco5k.txt")
    assert n == 3 and path.read_text() == "Two cats.\nFirst tram caption\nA dog on a couch.\n"
    import hashlib
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == prompts_sha256([c for _, c in pairs])
    assert json.loads(path.with_suffix(".json").read_text())["image_ids"] == [7, 19, 42]
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        coco_captions(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="captions_val2017"):
        coco_captions(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from hsd.models.components import build_components
    return build_components("tiny-sd15").save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def _counting_loader(counts):
    from eval.run import load_spec_generator

    def load(spec, device):
        gen = load_spec_generator(spec, device)
        generate = gen.generate

        def counted(prompts, *args, **kwargs):
            counts["generated"] += len(prompts)
            return generate(prompts, *args, **kwargs)
        gen.generate = counted
        return gen
    return load


def _table(out):
    return json.loads((out / "table.json").read_text())["rows"]


def test_killed_eval_resumes_without_redoing_work(weights, tiny_model, tmp_path):
    """SIGKILL a `python -m eval` run mid-way; the rerun generates and scores only what is missing and
    prints the uninterrupted run's table."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")
    spec = ModelSpec(name="tiny", model=str(tiny_model), steps=2)
    whole = run_eval([spec], PROMPTS * 2, weights, tmp_path / "whole", batch_size=2)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "eval", "--weights", str(weights), "--prompts", str(prompts), "--model",
           str(tiny_model), "--name", "tiny", "--steps", "2", "--batch-size", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    scores = out / f"tiny-{spec.key()}" / "scores.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not scores.exists() or scores.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = scores.read_text().count("\n")
    pngs = len(list(scores.parent.glob("images/*.png")))
    assert 2 <= done < 10 and pngs < 10, (done, pngs)
    counts = {"generated": 0}
    resumed = run_eval([spec], PROMPTS * 2, weights, out, batch_size=2, load=_counting_loader(counts))
    assert counts["generated"] == 10 - pngs
    assert scores.read_text().count("\n") == 10            # each item scored exactly once over both runs
    assert resumed[0].n == whole[0].n == 10
    for metric, value in whole[0].scores.items():
        assert abs(resumed[0].scores[metric] - value) < 1e-5, metric
    assert (out / "table.md").read_text() == (tmp_path / "whole" / "table.md").read_text()
    counts["generated"] = 0                                 # a finished eval redoes nothing
    run_eval([spec], PROMPTS * 2, weights, out, batch_size=2, load=_counting_loader(counts))
    assert counts["generated"] == 0 and scores.read_text().count("\n") == 10


def test_unreadable_image_is_skipped_and_counted(weights, tiny_model, tmp_path):
    spec = ModelSpec(name="tiny", model=str(tiny_model), steps=1)
    first = run_eval([spec], PROMPTS, weights, tmp_path, metrics=("CLIP",), batch_size=5)
    store = tmp_path / f"tiny-{spec.key()}"
    records = [json.loads(line) for line in (store / "scores.jsonl").read_text().splitlines()]
    (store / "scores.jsonl").unlink()
    victim = sorted(store.glob("images/*.png"))[1]
    victim.write_bytes(victim.read_bytes()[:100])           # truncated file
    with pytest.warns(UserWarning, match="cannot read image"):
        again = run_eval([spec], PROMPTS, weights, tmp_path, metrics=("CLIP",), batch_size=5)
    assert again[0].n == 4 and len(again[0].skipped) == 1 and victim.name in again[0].skipped[0]
    kept = [r["CLIP"] for r in records if r["i"] != 1]
    assert abs(again[0].scores["CLIP"] - max(sum(kept) / 4, 0)) < 1e-5
    assert first[0].n == 5
    row = _table(tmp_path)[0]
    assert row["skipped"] == 1 and row["N"] == 4


def test_table_puts_paper_numbers_beside_matching_rows(weights, tiny_model, tmp_path):
    spec = ModelSpec(name="mine", model=str(tiny_model), steps=1, paper="Hyper-SD15",
                     lora=())  # type UNet: no Table 2 row "Hyper-SD15, 1, UNet" -> no paper numbers
    lora_spec = ModelSpec(name="Hyper-SD15", model=str(tiny_model), steps=1, lora=(("x.safetensors", 1.0),))
    from eval.run import Summary
    from eval.table import markdown, rows
    table = rows([Summary(spec, {"CLIP": 30.0}, 5), Summary(lora_spec, {"CLIP": 29.5, "PickScore": 0.2}, 5)])
    assert table[0]["paper CLIP"] is None and table[1]["paper CLIP"] == 30.87
    assert table[1]["paper PickScore"] == 0.215 and table[1]["paper row"] == "Table 2: Hyper-SD15"
    md = markdown(table, "0" * 64, 0)
    assert "| Hyper-SD15 | 1 | LoRA | 29.50 (30.87) | - | - | 0.200 (0.215) | 5 | 0 |" in md


def test_eval_cli_errors(weights, tmp_path):
    from eval.cli import METRIC_NAMES
    from hsd.cli import main
    from hsd.scorers.scorers import METRICS
    assert METRIC_NAMES == METRICS
    spec = tmp_path / "spec.yaml"
    spec.write_text("specs:\n  - {name: a, model: m, steps: 1, stepz: 2}\n")
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(SystemExit, match="unknown model spec keys.*stepz"):
        main(["eval", "--weights", str(weights), "--prompts", str(tmp_path / "p.txt"), "--spec", str(spec),
              "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="scorer weights folder not found"):
        main(["eval", "--weights", str(tmp_path / "none"), "--prompts", str(tmp_path / "p.txt"), "--model", "m",
              "--out", str(tmp_path / "o")])


def test_experiment_specs_name_paper_rows():
    """experiments/eval/*.yaml load as model specs; the rows named after the paper's find their paper numbers."""
    from types import SimpleNamespace

    from eval.cli import specs_from_args
    from eval.table import paper_row
    matched = 0
    for f in sorted((ROOT / "experiments" / "eval").glob("*.yaml")):
        for spec in specs_from_args(SimpleNamespace(spec=[f])):
            assert spec.model.startswith("models/") and spec.key()
            matched += paper_row(spec.paper or spec.name, spec.steps, spec.type) is not None
    assert matched == 12      # SD15: base, 1-step, unified 2/4/8; SDXL: base, 4-step, 1-step UNet, unified 1/2/4/8


def test_differentiable_crop_tracks_the_pil_crop():
    """`resize_crop` (the training rewards' path) is close to the evaluation crop and passes gradients."""
    from hsd.scorers.images import resize_crop
    image = _images(1, 512)[0].resize((512, 384))
    x = to_unit(pil_to_tensor(image)[None]).requires_grad_(True)
    ours = resize_crop(x)
    assert ours.shape == (1, 3, 224, 224)
    assert (ours - to_unit(crop224(image)[None])).abs().mean() < 5e-3   # about one uint8 level
    ours.sum().backward()
    assert x.grad.abs().sum() > 0
