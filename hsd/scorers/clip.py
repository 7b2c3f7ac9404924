"""OpenAI CLIP models through open_clip, loaded offline from local files.

A model is a folder in open_clip's hub layout (what `timm/vit_base_patch32_clip_224.openai` and
`timm/vit_large_patch14_clip_224.openai` hold): `open_clip_config.json` (its "model_cfg") plus
`open_clip_model.safetensors` or `open_clip_pytorch_model.bin`. A bare weights file is read with the metric's
default architecture. open_clip ships the OpenAI BPE vocabulary, so tokenising needs no download either.
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

from hsd.errors import MissingFileError
from hsd.io import load_weights

from . import ScorerWeightsError

CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CONTEXT = 77
# A CLIP of the real layout with few, narrow layers: for tests, benchmarks' smoke runs and the notebook.
TINY = {"embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def model_config(arch_or_cfg: str | dict) -> dict:
    import open_clip
    if isinstance(arch_or_cfg, dict):
        return arch_or_cfg
    cfg = open_clip.get_model_config(arch_or_cfg)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch_or_cfg!r}")
    return cfg


def build_clip(arch_or_cfg: str | dict, seed: int | None = None):
    """An open_clip CLIP of the given architecture, random weights (seeded when `seed` is given)."""
    from open_clip.model import CLIP
    if seed is not None:
        torch.manual_seed(seed)
    return CLIP(**model_config(arch_or_cfg)).eval()


def save_clip(model, cfg: str | dict, folder: str | Path) -> Path:
    """Write `model` in open_clip's hub layout."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps({"model_cfg": model_config(cfg)}, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS[0])
    return folder


def load_clip(path: str | Path, default_arch: str, metric: str):
    """An open_clip folder (config + weights) or a bare weights file read as `default_arch`."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
        cfg_file = path / CONFIG
        cfg = json.loads(cfg_file.read_text())["model_cfg"] if cfg_file.is_file() else default_arch
    else:
        weights, cfg = (path if path.is_file() else None), default_arch
    if weights is None:
        raise MissingFileError(
            f"{metric}: no CLIP weights at {path}; expected a folder with {CONFIG} and {' or '.join(WEIGHTS)} "
            f"(open_clip's hub layout) or a weights file of {default_arch}")
    model = build_clip(cfg)
    state = load_weights(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        arch = default_arch if isinstance(cfg, str) else "config"
        raise ScorerWeightsError(f"{metric}: {weights} does not fit open_clip {arch}"
                                 f": missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval().requires_grad_(False)


@lru_cache
def _tokenizer(context_length: int):
    """Built once: it parses open_clip's 49k-merge BPE file (0.17 s), which every batch would otherwise repeat."""
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=context_length)


def tokenize(prompts: list[str], context_length: int = CONTEXT) -> torch.Tensor:
    """OpenAI CLIP tokens (B, 77); a longer caption is cut with its end-of-text token kept last."""
    return _tokenizer(context_length)(list(prompts))


class TransformersStyleClip(torch.nn.Module):
    """An open_clip model behind the two feature methods torchmetrics' CLIPScore calls, returning tensors
    (transformers 5's CLIPModel returns output objects there, which CLIPScore cannot normalise). `config` is
    None, so CLIPScore does not cut token ids itself: the tokenizer already keeps end-of-text last."""
    config = None

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def write_hf_tokenizer(folder: str | Path) -> Path:
    """The real OpenAI CLIP tokenizer as a transformers folder (vocab.json + merges.txt), built from the BPE
    file open_clip ships: PickScore's processor and the tests need one and no hub is reachable."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return folder
