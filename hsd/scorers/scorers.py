"""The four metrics of the paper's tables as differentiable scorers: pixels (B, 3, 224, 224) in [0, 1] and
prompts in, (B,) scores out. The same modules are the feedback stage's rewards. `ScoreHead` (the Aes and
ImageReward MLP) is in heads.py.

  CLIP         100 * cos(image, text) with OpenAI CLIP ViT-B/32 (QuickGELU), open_clip 'ViT-B-32-quickgelu'.
  Aes          LAION improved-aesthetic-predictor v2 (sac+logos+ava1-l14-linearMSE.pth) on the L2-normalised
               OpenAI CLIP ViT-L/14 image embedding.
  ImageReward  ImageReward v1.0 (hsd/scorers/imagereward.py), normalised by its published mean and std.
  PickScore    PickScore v1: cos(image, text); `raw` is the README's exp(logit_scale) * cos.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hsd.errors import ConfigError, MissingFileError
from hsd.io import load_weights

from . import clip
from .heads import ScoreHead
from .imagereward import load_imagereward
from .images import normalize

AES_HEAD = "sac+logos+ava1-l14-linearMSE.pth"


class ClipScorer(nn.Module):
    name = "CLIP"

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = pixels.device
        image = self.model.encode_image(normalize(pixels), normalize=True)
        text = self.model.encode_text(clip.tokenize(prompts).to(device), normalize=True)
        return 100 * (image * text).sum(-1)


class AestheticScorer(nn.Module):
    name = "Aes"

    def __init__(self, model, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, pixels: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        embedding = self.model.encode_image(normalize(pixels), normalize=True)
        return self.head(embedding).squeeze(-1)


class PickScorer(nn.Module):
    """transformers CLIPModel; projections taken directly so the result is a tensor under transformers 5,
    whose get_*_features return model outputs."""
    name = "PickScore"

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def cosine(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        m = self.model
        image = m.visual_projection(m.vision_model(pixel_values=normalize(pixels)).pooler_output)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77,
                                return_tensors="pt").to(pixels.device)
        text = m.text_projection(m.text_model(input_ids=tokens.input_ids,
                                              attention_mask=tokens.attention_mask).pooler_output)
        return (nn.functional.normalize(image, dim=-1) * nn.functional.normalize(text, dim=-1)).sum(-1)

    def forward(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.cosine(pixels, prompts)

    @property
    def scale(self) -> float:
        """exp(logit_scale): raw score = scale * cosine."""
        return self.model.logit_scale.exp().item()


def _require(metric: str, *paths: Path, hint: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MissingFileError(f"{metric}: missing {', '.join(missing)}; expected {hint}")


def load_clip_scorer(folder: Path) -> ClipScorer:
    return ClipScorer(clip.load_clip(folder, "ViT-B-32-quickgelu", "CLIP"))


def load_aesthetic_scorer(folder: Path) -> AestheticScorer:
    _require("Aes", folder / AES_HEAD, hint=f"{folder}/{AES_HEAD} (the LAION improved-aesthetic-predictor head) "
             f"and {folder}/clip/ (OpenAI CLIP ViT-L/14 in open_clip's layout)")
    head = ScoreHead()
    head.load_state_dict(load_weights(folder / AES_HEAD))
    return AestheticScorer(clip.load_clip(folder / "clip", "ViT-L-14-quickgelu", "Aes"), head.eval())


def load_pick_scorer(folder: Path) -> PickScorer:
    from transformers import AutoTokenizer, CLIPModel
    _require("PickScore", folder / "model" / "config.json", folder / "processor",
             hint=f"{folder}/model/ (yuvalkirstain/PickScore_v1, a transformers CLIPModel folder) and "
                  f"{folder}/processor/ (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor, tokenizer files)")
    model = CLIPModel.from_pretrained(folder / "model", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder / "processor", local_files_only=True)
    return PickScorer(model.eval().requires_grad_(False), tokenizer)


def load_imagereward_scorer(folder: Path):
    return load_imagereward(folder / "ImageReward.pt", folder / "med_config.json", folder / "bert-base-uncased")


# name -> (subfolder of the weights folder, loader)
LOADERS = {"CLIP": ("clip", load_clip_scorer), "Aes": ("aesthetic", load_aesthetic_scorer),
           "ImageReward": ("imagereward", load_imagereward_scorer), "PickScore": ("pickscore", load_pick_scorer)}
METRICS = tuple(LOADERS)


def load_scorers(weights: str | Path, metrics: tuple[str, ...] = METRICS, device: str = "cpu") -> dict:
    """The named scorers from one weights folder (layout in docs/eval.md), frozen, in eval mode."""
    weights = Path(weights)
    unknown = set(metrics) - set(LOADERS)
    if unknown:
        raise ConfigError(f"unknown metrics {sorted(unknown)}; known: {list(LOADERS)}")
    if not weights.is_dir():
        raise MissingFileError(f"scorer weights folder not found: {weights} (layout in docs/eval.md)")
    scorers = {}
    for name in metrics:
        sub, loader = LOADERS[name]
        scorers[name] = loader(weights / sub).to(device).eval().requires_grad_(False)
    return scorers


@torch.no_grad()
def score_batch(scorers: dict, pixels: torch.Tensor, prompts: list[str]) -> dict[str, list[float]]:
    """Every metric for one batch of crops; PickScore also as its raw README score."""
    out = {}
    for name, scorer in scorers.items():
        values = scorer(pixels, prompts).float()
        out[name] = values.tolist()
        if name == "PickScore":
            out["PickScore_raw"] = (values * scorer.scale).tolist()
    return out
