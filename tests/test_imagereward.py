"""Our ImageReward (hsd/scorers/imagereward.py, transformers 5 BLIP classes) against the image-reward==1.5 package.

tests/fixtures/imagereward_golden.json holds the package's own `ImageReward.score(prompt, pil_image)` on a
synthetic full-size checkpoint, made in the pinned old stack by `bash scripts/imagereward_reference.sh`. Here the
same weights, vocab, med_config and images are rebuilt and scored in one batch by our scorer.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hsd.scorers.imagereward import (
    ImageRewardScorer,
    imagereward_key_map,
    imagereward_official_shapes,
    load_imagereward,
    med_config_for,
    random_imagereward_state_dict,
    synthetic_bert_vocab,
    synthetic_image,
    write_bert_vocab,
)
from hsd.scorers.imagereward_weights import tensor_sha256
from hsd.scorers.images import crop224 as shared_crop
from hsd.scorers.images import to_unit

FIXTURE = Path(__file__).parent / "fixtures" / "imagereward_golden.json"
TINY_VISION = dict(width=64, depth=2)
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def write_test_bert_vocab(folder: Path, vocab: list[str] | None = None) -> int:
    """A bert-base-uncased-style folder (vocab.txt) with the synthetic vocab; returns its size."""
    return write_bert_vocab(folder, vocab)


def crop224(image: Image.Image) -> torch.Tensor:
    """The eval pass's shared crop (hsd/scorers/images.py), as float in [0, 1]: what the package's preprocessing does
    before its normalisation."""
    return to_unit(shared_crop(image)[None])[0]


def _files(folder: Path, med: dict, sd: dict) -> tuple[Path, Path, Path]:
    write_test_bert_vocab(folder / "bert-base-uncased")
    (folder / "med_config.json").write_text(json.dumps(med))
    torch.save(sd, folder / "ImageReward.pt")
    return folder / "ImageReward.pt", folder / "med_config.json", folder / "bert-base-uncased"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ImageRewardScorer:
    folder = tmp_path_factory.mktemp("ir_tiny")
    med = med_config_for(vocab_size=len(synthetic_bert_vocab()) + 2, **TINY_BERT)
    return load_imagereward(*_files(folder, med, random_imagereward_state_dict(med, 3, vision=TINY_VISION)))


@pytest.mark.slow
def test_matches_image_reward_package(tmp_path):
    golden = json.loads(FIXTURE.read_text())
    assert golden["vocab"] == synthetic_bert_vocab()
    med = golden["med_config"]
    files = _files(tmp_path, med, random_imagereward_state_dict(med, golden["seed"]))
    scorer = load_imagereward(*files)
    files[0].unlink()  # 1.7 GB
    assert scorer.name == "ImageReward" and not scorer.training
    assert not any(p.requires_grad for p in scorer.parameters())

    cases = golden["cases"]
    pixels, prompts = [], []
    for case in cases:
        spec = case["image"]
        img = synthetic_image(spec["seed"], spec["width"], spec["height"])
        assert tensor_sha256(img) == spec["sha256"], "synthetic image differs from the one the package scored"
        pixels.append(crop224(Image.fromarray(img.numpy())))
        prompts.append(case["prompt"])
    tokens = scorer.tokenize(prompts)
    assert tokens["input_ids"].tolist() == [c["input_ids"] for c in cases]  # tokenizer parity, incl. truncation

    with torch.no_grad():
        ours = scorer(torch.stack(pixels), prompts)
    golden_scores = torch.tensor([c["score"] for c in cases], dtype=torch.float64)
    diff = (ours.double() - golden_scores).abs().max().item()
    print(f"max |ours - package| = {diff:.3g}")
    assert diff < 1e-4, (ours.tolist(), golden_scores.tolist())

    # the synthetic weights must make the reward depend on both inputs, or the parity above proves little
    assert golden_scores.max() - golden_scores.min() > 0.1
    same_image = [i for i, c in enumerate(cases) if c["image"] == cases[0]["image"]]
    assert len(same_image) >= 2 and abs(golden_scores[same_image[0]] - golden_scores[same_image[1]]) > 0.05
    with torch.no_grad():
        one_prompt = scorer(torch.stack(pixels), [cases[0]["prompt"]] * len(cases))
    assert one_prompt.std() > 0.1, one_prompt.tolist()


def test_key_map_covers_official_layout():
    med = med_config_for(vocab_size=100)
    shapes = imagereward_official_shapes(med)
    names = imagereward_key_map(shapes)
    assert set(names) == set(shapes)
    dropped = {k for k, v in names.items() if v is None}
    assert dropped == {"blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight",
                       "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias"}
    assert names["blip.visual_encoder.blocks.23.attn.proj.weight"] == \
        "vision.encoder.layers.23.self_attn.projection.weight"
    assert names["blip.visual_encoder.norm.bias"] == "vision.post_layernorm.bias"
    assert names["mlp.layers.7.weight"] == "head.layers.7.weight"
    assert names["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == \
        "text.encoder.layer.11.crossattention.self.key.weight"
    assert imagereward_key_map({"blip.itm_head.weight": 0, "blip.text_encoder_m.x": 0, "foo": 0}) == \
        {"blip.itm_head.weight": None, "blip.text_encoder_m.x": None}


def test_random_state_dict_is_deterministic_per_key():
    med = med_config_for(vocab_size=50, **TINY_BERT)
    a = random_imagereward_state_dict(med, 0, vision=TINY_VISION)
    b = random_imagereward_state_dict(med, 0, vision=dict(TINY_VISION, depth=3))
    c = random_imagereward_state_dict(med, 1, vision=TINY_VISION)
    assert all(torch.equal(a[k], b[k]) for k in a)  # a tensor depends on (seed, key) only
    assert not torch.equal(a["mlp.layers.0.weight"], c["mlp.layers.0.weight"])


def test_batched_equals_single_and_gradient_reaches_pixels(tiny):
    pixels = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon, digital art", "a red cube"]
    with torch.no_grad():
        batched = tiny(pixels, prompts)
        single = torch.cat([tiny(pixels[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)

    x = pixels.clone().requires_grad_(True)
    tiny(x, prompts).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_rejects_wrong_pixels(tiny):
    with pytest.raises(ValueError, match="uint8"):
        tiny((torch.rand(1, 3, 224, 224) * 255).to(torch.uint8), ["a cat"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny(torch.rand(1, 3, 224, 224) * 255, ["a cat"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny(torch.rand(1, 3, 224, 224) * 2 - 1, ["a cat"])
    with pytest.raises(ValueError, match="224x224"):
        tiny(torch.rand(1, 3, 256, 256), ["a cat"])
    with pytest.raises(ValueError, match="prompts"):
        tiny(torch.rand(2, 3, 224, 224), ["a cat"])


def test_missing_files_name_metric_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_imagereward(tmp_path / "ImageReward.pt", tmp_path / "med_config.json", tmp_path / "bert-base-uncased")
    msg = str(err.value)
    for word in ("ImageReward", "ImageReward.pt", "med_config.json", "bert-base-uncased", "vocab.txt"):
        assert word in msg


def test_key_mismatch_is_reported(tmp_path):
    med = med_config_for(vocab_size=len(synthetic_bert_vocab()) + 2, **TINY_BERT)
    sd = random_imagereward_state_dict(med, 0, vision=TINY_VISION)
    sd["blip.itm_head.weight"] = torch.zeros(2, 64)  # known-unused: ignored
    del sd["blip.text_encoder.encoder.layer.1.output.dense.bias"]
    sd["blip.visual_encoder.blocks.0.attn.relative_bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_imagereward(*_files(tmp_path, med, sd))
    msg = str(err.value)
    assert "text.encoder.layer.1.output.dense.bias" in msg and "blocks.0.attn.relative_bias" in msg
    assert "itm_head" not in msg
