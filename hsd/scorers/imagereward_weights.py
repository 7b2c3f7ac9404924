"""Deterministic stand-ins for the ImageReward v1.0 checkpoint and its inputs (pure torch, no transformers).

The real `ImageReward.pt` cannot be fetched on our machines, so the parity test between our scorer
(hsd/scorers/imagereward.py) and the image-reward==1.5 package runs both on a synthetic checkpoint with the official
layout. This module must stay importable by file path from the pinned reference environment
(scripts/imagereward_golden.py), so it imports nothing but torch, zlib and the standard library.

- `imagereward_official_shapes(med_config)`: key -> (shape, dtype) of the state dict of the package's
  `ImageReward` module (BLIP ViT-L/16 at 224 under `blip.visual_encoder`, the med.py BERT with cross-attention
  under `blip.text_encoder`, BLIP's `vision_proj`/`text_proj`, and the 5-linear `mlp.layers`).
- `random_imagereward_state_dict(med_config, seed)`: a full state dict in that layout, each tensor drawn from a
  generator seeded by (seed, crc32(key)), scaled so that the reward is O(1) and clearly image-dependent.
- `med_config_for(vocab_size, ...)`: BLIP's med_config.json (the BERT-base config ImageReward ships), with overrides.
- `synthetic_bert_vocab()` / `write_bert_vocab(folder)`: a small WordPiece vocab (a few hundred entries) that
  tokenizes any ASCII prompt, written as a `bert-base-uncased`-style tokenizer folder (vocab.txt).
- `synthetic_image(seed, width, height)`: a structured uint8 RGB image (H, W, 3).
"""
from __future__ import annotations

import hashlib
import math
import string
import zlib
from pathlib import Path

import torch

# BLIP ViT-L/16 as the package builds it: create_vit('large', 224) -> VisionTransformer(embed_dim=1024, depth=24,
# num_heads=16, patch_size=16, mlp_ratio=4, qkv_bias=True, LayerNorm(eps=1e-6)).
VISION_WIDTH = 1024
VISION_DEPTH = 24
VISION_HEADS = 16
PATCH_SIZE = 16
IMAGE_SIZE = 224
BLIP_EMBED_DIM = 256  # vision_proj / text_proj output width in BLIP_Pretrain
MLP_WIDTHS = (1024, 128, 64, 16, 1)  # ImageReward MLP: Linear(768,1024) ... Linear(16,1), Linear at indices 0,2,4,6,7
MLP_INDICES = (0, 2, 4, 6, 7)
QK_GAIN = 2.0  # random_imagereward_state_dict: scale of query/key weights
RESIDUAL_GAIN = 0.5  # ... and of the projections that write into the residual stream

# BLIP's configs/med_config.json, which ImageReward ships as its med_config.json (BERT-base, cross-attention on).
# `encoder_width` is overwritten with the vision width (1024) when the package builds the model.
MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}


def med_config_for(vocab_size: int | None = None, **overrides) -> dict:
    """MED_CONFIG with `vocab_size` (the tokenizer's vocab + [DEC] + [ENC]) and any other field overridden."""
    cfg = dict(MED_CONFIG, **overrides)
    if vocab_size is not None:
        cfg["vocab_size"] = int(vocab_size)
    return cfg


def _vision_dims(vision: dict | None) -> tuple[int, int]:
    """(width, depth) of the ViT; `vision` (e.g. dict(width=64, depth=2, heads=2)) shrinks it for fast tests.
    The head count does not change any shape (the loader uses width // 64, BLIP's head size)."""
    vision = vision or {}
    return int(vision.get("width", VISION_WIDTH)), int(vision.get("depth", VISION_DEPTH))


def imagereward_official_shapes(med_config: dict, vision: dict | None = None
                                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of `ImageReward(med_config).state_dict()` in image-reward==1.5 (vit='large', 224)."""
    f = torch.float32
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    w, depth = _vision_dims(vision)
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    v = "blip.visual_encoder."
    shapes[v + "cls_token"] = ((1, 1, w), f)
    shapes[v + "pos_embed"] = ((1, n_patches + 1, w), f)
    shapes[v + "patch_embed.proj.weight"] = ((w, 3, PATCH_SIZE, PATCH_SIZE), f)
    shapes[v + "patch_embed.proj.bias"] = ((w,), f)
    for i in range(depth):
        b = f"{v}blocks.{i}."
        for name, shape in (("norm1", (w,)), ("norm2", (w,))):
            shapes[b + name + ".weight"] = (shape, f)
            shapes[b + name + ".bias"] = (shape, f)
        for name, (out, inp) in (("attn.qkv", (3 * w, w)), ("attn.proj", (w, w)),
                                 ("mlp.fc1", (4 * w, w)), ("mlp.fc2", (w, 4 * w))):
            shapes[b + name + ".weight"] = ((out, inp), f)
            shapes[b + name + ".bias"] = ((out,), f)
    shapes[v + "norm.weight"] = ((w,), f)
    shapes[v + "norm.bias"] = ((w,), f)

    h, inter = med_config["hidden_size"], med_config["intermediate_size"]
    t = "blip.text_encoder."
    # med.py registers position_ids as a persistent buffer, so the checkpoint carries it
    shapes[t + "embeddings.position_ids"] = ((1, med_config["max_position_embeddings"]), torch.int64)
    shapes[t + "embeddings.word_embeddings.weight"] = ((med_config["vocab_size"], h), f)
    shapes[t + "embeddings.position_embeddings.weight"] = ((med_config["max_position_embeddings"], h), f)
    shapes[t + "embeddings.LayerNorm.weight"] = ((h,), f)
    shapes[t + "embeddings.LayerNorm.bias"] = ((h,), f)
    for i in range(med_config["num_hidden_layers"]):
        lay = f"{t}encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if med_config.get("add_cross_attention", False) else [])
        for att in blocks:
            kv_in = w if att == "crossattention" else h  # encoder_width is replaced by the vision width
            for name, inp in (("query", h), ("key", kv_in), ("value", kv_in)):
                shapes[f"{lay}{att}.self.{name}.weight"] = ((h, inp), f)
                shapes[f"{lay}{att}.self.{name}.bias"] = ((h,), f)
            shapes[f"{lay}{att}.output.dense.weight"] = ((h, h), f)
            shapes[f"{lay}{att}.output.dense.bias"] = ((h,), f)
            shapes[f"{lay}{att}.output.LayerNorm.weight"] = ((h,), f)
            shapes[f"{lay}{att}.output.LayerNorm.bias"] = ((h,), f)
        shapes[lay + "intermediate.dense.weight"] = ((inter, h), f)
        shapes[lay + "intermediate.dense.bias"] = ((inter,), f)
        shapes[lay + "output.dense.weight"] = ((h, inter), f)
        shapes[lay + "output.dense.bias"] = ((h,), f)
        shapes[lay + "output.LayerNorm.weight"] = ((h,), f)
        shapes[lay + "output.LayerNorm.bias"] = ((h,), f)

    # BLIP_Pretrain's contrastive projections: in the checkpoint, unused by the reward
    shapes["blip.vision_proj.weight"] = ((BLIP_EMBED_DIM, w), f)
    shapes["blip.vision_proj.bias"] = ((BLIP_EMBED_DIM,), f)
    shapes["blip.text_proj.weight"] = ((BLIP_EMBED_DIM, h), f)
    shapes["blip.text_proj.bias"] = ((BLIP_EMBED_DIM,), f)

    fan_in = h
    for idx, out in zip(MLP_INDICES, MLP_WIDTHS):
        shapes[f"mlp.layers.{idx}.weight"] = ((out, fan_in), f)
        shapes[f"mlp.layers.{idx}.bias"] = ((out,), f)
        fan_in = out
    return shapes


def _generator(seed: int, key: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    # torch's CPU generator keeps only 32 bits of a seed: mix the seed into them
    g.manual_seed((zlib.crc32(key.encode("utf-8")) ^ (int(seed) * 0x9E3779B1)) & 0xFFFFFFFF)
    return g


def _draw(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    z = torch.randn(shape, generator=g, dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith(("cls_token", "pos_embed")):
        return 0.02 * z
    if "embeddings" in key and key.endswith("_embeddings.weight"):  # word / position embeddings
        return 0.02 * z
    if "norm" in key.lower() and leaf == "weight":  # LayerNorm / norm1 / norm2 / norm
        return 1.0 + 0.1 * z
    if leaf == "bias":
        return 0.1 * z
    w = z / math.sqrt(math.prod(shape[1:]))  # N(0, 1/fan_in): keeps activations O(1) through each linear layer
    # Plain N(0, 1/fan_in) everywhere gives near-uniform attention and sublayers that swamp the residual stream,
    # so the [CLS] feature forgets the prompt (reward std over prompts ~0.005). Sharper attention (query/key x2)
    # and damped residual branches (output projections x0.5) make the reward depend clearly on image and prompt.
    if key.endswith(("self.query.weight", "self.key.weight")):
        w = w * QK_GAIN
    elif key.endswith("attn.qkv.weight"):  # fused [q; k; v] rows of the ViT
        n = shape[0] // 3
        w = torch.cat([w[:2 * n] * QK_GAIN, w[2 * n:]])
    elif key.endswith(("output.dense.weight", "attn.proj.weight", "mlp.fc2.weight")):
        w = w * RESIDUAL_GAIN
    return w


def random_imagereward_state_dict(med_config: dict, seed: int, vision: dict | None = None
                                  ) -> dict[str, torch.Tensor]:
    """A deterministic, full official-layout ImageReward state dict (no model is built).

    Each key, in sorted order, gets its own generator seeded with crc32(key) ^ (seed * 0x9E3779B1), so a tensor depends
    only on (seed, key, shape) and not on which other keys exist. 2-D+ weights ~ N(0, 1/fan_in) (query/key x2,
    residual output projections x0.5); word/position embeddings and cls/pos ~ 0.02 N; LayerNorm weights 1 + 0.1 N;
    biases 0.1 N; position_ids = arange.
    `vision` (dict(width=, depth=)) shrinks the ViT for fast tests; None is the real ViT-L/16.
    """
    out: dict[str, torch.Tensor] = {}
    shapes = imagereward_official_shapes(med_config, vision)
    for key in sorted(shapes):
        shape, dtype = shapes[key]
        if dtype == torch.int64:  # position_ids buffer
            out[key] = torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
            continue
        out[key] = _draw(key, shape, _generator(seed, key)).contiguous()
    return out


def synthetic_bert_vocab() -> list[str]:
    """A small uncased WordPiece vocab: specials, ASCII letters/digits/punctuation (+ ## pieces), common words."""
    words = ("a an the of on in at with and to is for by from photo picture painting portrait drawing art "
             "digital oil style cat dog horse man woman girl boy city street night day sun moon sky sea "
             "mountain forest tree flower red blue green yellow black white golden dark light big small old "
             "new beautiful highly detailed realistic cinematic lighting trending artstation 4k 8k hd render "
             "astronaut riding standing sitting under over near cafe paris castle dragon robot car house "
             "water fire snow rain cloud river lake garden").split()
    pieces = ("s ing ed er est ly tion ness ful less able al ic ous ive y es en ist ism ment ity").split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    for w in words:
        if w not in vocab:
            vocab.append(w)
    for p in pieces:
        if "##" + p not in vocab:
            vocab.append("##" + p)
    return vocab


def write_bert_vocab(folder: str | Path, vocab: list[str] | None = None) -> int:
    """Write `vocab` (default: synthetic_bert_vocab()) as folder/vocab.txt; returns its size (add 2 for [DEC], [ENC])."""
    vocab = synthetic_bert_vocab() if vocab is None else list(vocab)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(tok + "\n" for tok in vocab), encoding="utf-8")
    return len(vocab)


def synthetic_image(seed: int, width: int, height: int) -> torch.Tensor:
    """A structured, deterministic uint8 RGB image (height, width, 3): gradient, blobs, rectangles, stripes, grain."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    y = torch.linspace(0.0, 1.0, height, dtype=torch.float32)[:, None].expand(height, width)
    x = torch.linspace(0.0, 1.0, width, dtype=torch.float32)[None, :].expand(height, width)
    c0, c1 = torch.rand(3, generator=g), torch.rand(3, generator=g)
    t = (0.6 * x + 0.4 * y)[..., None]
    img = c0 * (1 - t) + c1 * t  # (H, W, 3) background gradient
    for _ in range(4):  # soft ellipses
        cx, cy, rx, ry = torch.rand(4, generator=g).tolist()
        col = torch.rand(3, generator=g)
        d = ((x - cx) / (0.05 + 0.3 * rx)) ** 2 + ((y - cy) / (0.05 + 0.3 * ry)) ** 2
        a = torch.sigmoid((1.0 - d) * 8.0)[..., None]
        img = img * (1 - a) + col * a
    for _ in range(3):  # hard rectangles
        x0, y0, sx, sy = torch.rand(4, generator=g).tolist()
        col = torch.rand(3, generator=g)
        m = ((x >= x0) & (x <= x0 + 0.3 * sx) & (y >= y0) & (y <= y0 + 0.3 * sy)).float()[..., None]
        img = img * (1 - m) + col * m
    freq, phase = 4 + 20 * torch.rand(1, generator=g).item(), 6.2832 * torch.rand(1, generator=g).item()
    img = img + 0.08 * torch.sin(freq * 6.2832 * (x - 0.5 * y) + phase)[..., None]
    img = img + 0.03 * torch.randn(height, width, 3, generator=g)
    return (img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
