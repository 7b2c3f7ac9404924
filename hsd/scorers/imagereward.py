"""ImageReward v1.0 (Xu et al. 2023) on transformers 5's BLIP classes, loading the official `ImageReward.pt`.

The image-reward==1.5 package no longer imports under transformers 5 (its BLIP `med.py` imports helpers that
left `transformers.modeling_utils`), so this is our own model with the package's numbers, checked against the
package itself run in a pinned old stack (scripts/imagereward_reference.sh -> tests/fixtures/imagereward_golden.json,
tests/test_imagereward.py; max |diff| ~1e-6).

What the package's `ImageReward.score(prompt, image)` computes, and what we compute batched:

  tokens  BertTokenizer(bert-base-uncased) + [DEC] as bos_token + [ENC] as an additional special token (BLIP's
          init_tokenizer), padding='max_length', truncation=True, max_length=35; [CLS] stays first (the score
          path does not swap it for [ENC]).
  image   PIL bicubic resize of the short side to 224, centre crop 224, [0, 1], OpenAI CLIP mean/std. Pixels
          arrive here already cropped and in [0, 1]; the scorer normalises.
  vision  BLIP ViT-L/16: pre-LN blocks, LayerNorm eps 1e-6, exact (erf) GELU, qkv with bias; the output is the
          full token sequence after the final norm -> BlipVisionModel's last_hidden_state (post_layernorm).
  text    med.py BertModel (no token types, absolute positions, post-LN, eps from med_config) with cross-attention
          to the image tokens under an all-ones mask; the feature is last_hidden_state[:, 0]. In HF the
          cross-attention layers exist only when BlipTextConfig.is_decoder is True, while forward(is_decoder=False)
          keeps the bidirectional (encoder) self-attention mask the package uses.
  head    768 -> 1024 -> 128 -> 64 -> 16 -> 1, all linear (the ReLUs are commented out upstream), then
          (r - 0.16717362830052426) / 1.0333394966054072.

Official key -> our key (`imagereward_key_map`):

  blip.visual_encoder.cls_token                 vision.embeddings.class_embedding
  blip.visual_encoder.pos_embed                 vision.embeddings.position_embedding
  blip.visual_encoder.patch_embed.proj.*        vision.embeddings.patch_embedding.*
  blip.visual_encoder.blocks.N.norm1.*          vision.encoder.layers.N.layer_norm1.*
  blip.visual_encoder.blocks.N.attn.qkv.*       vision.encoder.layers.N.self_attn.qkv.*
  blip.visual_encoder.blocks.N.attn.proj.*      vision.encoder.layers.N.self_attn.projection.*
  blip.visual_encoder.blocks.N.norm2.*          vision.encoder.layers.N.layer_norm2.*
  blip.visual_encoder.blocks.N.mlp.fc{1,2}.*    vision.encoder.layers.N.mlp.fc{1,2}.*
  blip.visual_encoder.norm.*                    vision.post_layernorm.*
  blip.text_encoder.<rest>                      text.<rest>   (BlipTextModel kept med.py's names)
  mlp.layers.{0,2,4,6,7}.*                      head.layers.{0,2,4,6,7}.*
  dropped: blip.text_encoder.embeddings.position_ids (a non-persistent arange in HF), blip.vision_proj/text_proj/
           itm_head, momentum copies (*_m), queues, temp, blip.text_decoder, a text pooler.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from hsd.errors import ConfigError, MissingFileError

from . import ScorerWeightsError
from .heads import ScoreHead
from .imagereward_weights import (
    MED_CONFIG,
    imagereward_official_shapes,
    med_config_for,
    random_imagereward_state_dict,
    synthetic_bert_vocab,
    synthetic_image,
    write_bert_vocab,
)
from .images import normalize

__all__ = ["ImageRewardScorer", "load_imagereward", "imagereward_key_map", "random_imagereward_state_dict",
           "imagereward_official_shapes", "med_config_for", "MED_CONFIG", "write_bert_vocab",
           "synthetic_bert_vocab", "synthetic_image", "REWARD_MEAN", "REWARD_STD", "MAX_LENGTH"]

NAME = "ImageReward"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
VISION_HEAD_DIM = 64  # BLIP's ViT-B (12 heads) and ViT-L (16 heads) both use 64-wide heads

_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VISION_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
# keys of BLIP checkpoints that ImageReward's score never reads
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj|itm_head|text_decoder|visual_encoder_m|text_encoder_m|"
                     r"vision_proj_m|text_proj_m)\.|^blip\.(image_queue|text_queue|idx_queue|ptr_queue|queue_ptr|"
                     r"temp)$|^blip\.text_encoder\.(embeddings\.position_ids|pooler\..*)$|_m\.")


def imagereward_key_map(state_dict: Mapping[str, object]) -> dict[str, str | None]:
    """Official ImageReward key -> our `ImageRewardScorer` key, or None for a known-unused key (see module doc).

    Pure: looks at key names only. Keys it does not recognise are left out of the result, so a caller can report
    them as unexpected.
    """
    out: dict[str, str | None] = {}
    for key in state_dict:
        if _UNUSED.search(key):
            out[key] = None
        elif key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            if rest in _VISION_TOP:
                out[key] = "vision." + _VISION_TOP[rest]
                continue
            m = re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
                             rest)
            if m:
                out[key] = f"vision.encoder.layers.{m[1]}.{_VISION_BLOCK[m[2]]}.{m[3]}"
        elif key.startswith("blip.text_encoder."):
            out[key] = "text." + key[len("blip.text_encoder."):]
        else:
            m = re.fullmatch(r"mlp\.layers\.(\d+)\.(weight|bias)", key)
            if m:
                out[key] = f"head.layers.{m[1]}.{m[2]}"
    return out


class ImageRewardScorer(nn.Module):
    """pixels (B, 3, S, S) float in [0, 1] (already resized and cropped) + B prompts -> (B,) normalised rewards.

    Differentiable in the pixels (the training reward uses the same module); batched over B.
    """

    name = NAME

    def __init__(self, vision: nn.Module, text: nn.Module, head: nn.Module, tokenizer, max_length: int = MAX_LENGTH):
        super().__init__()
        self.vision = vision
        self.text = text
        self.head = head
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_size = int(vision.config.image_size)

    @property
    def device(self) -> torch.device:
        return self.head.layers[0].weight.device

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def forward(self, pixels: torch.Tensor, prompts: list[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        b, _, h, w = pixels.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"{NAME} takes {self.image_size}x{self.image_size} crops, got {h}x{w} "
                             f"(resize the short side and centre-crop first)")
        if isinstance(prompts, str):
            prompts = [prompts] * b
        tokens = dict(prompts) if isinstance(prompts, Mapping) else self.tokenize(prompts)
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        if ids.shape[0] != b:
            raise ValueError(f"{NAME}: {b} images but {ids.shape[0]} prompts")

        x = normalize(pixels.to(self.device, torch.float32))       # refuses anything but [0, 1] floats
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        image_embeds = self.vision(pixel_values=x.to(dtype)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        text = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask, is_decoder=False)
        features = text.last_hidden_state[:, 0, :].float()  # the package also scores in float32
        rewards = self.head(features).squeeze(-1)
        return (rewards - REWARD_MEAN) / REWARD_STD


def _missing_files(checkpoint: Path, med_config, tokenizer_dir: Path) -> list[str]:
    missing = []
    if not checkpoint.is_file():
        missing.append(f"{checkpoint} (ImageReward.pt, the THUDM/ImageReward v1.0 checkpoint)")
    if not isinstance(med_config, Mapping) and not Path(med_config).is_file():
        missing.append(f"{med_config} (med_config.json, the BLIP BERT config shipped with ImageReward)")
    if not (tokenizer_dir / "vocab.txt").is_file():
        missing.append(f"{tokenizer_dir}/vocab.txt (a bert-base-uncased tokenizer folder)")
    return missing


def _few(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _tokenizer(folder: Path):
    from transformers import BertTokenizer
    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    # BLIP's init_tokenizer: the ids of [DEC] and [ENC] follow the BERT vocab (30522, 30523 for bert-base-uncased)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _vision_config(sd: Mapping[str, torch.Tensor], heads: int | None):
    from transformers.models.blip.modeling_blip import BlipVisionConfig
    v = "blip.visual_encoder."
    need = [v + "cls_token", v + "pos_embed", v + "patch_embed.proj.weight", v + "blocks.0.mlp.fc1.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise ScorerWeightsError(f"{NAME}: not an ImageReward checkpoint, missing keys: {_few(absent)}")
    width = sd[v + "cls_token"].shape[-1]
    patch = sd[v + "patch_embed.proj.weight"].shape[-1]
    grid = round((sd[v + "pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(m[1]) for k in sd if (m := re.match(re.escape(v) + r"blocks\.(\d+)\.", k)))
    return BlipVisionConfig(hidden_size=width, intermediate_size=sd[v + "blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=heads or max(1, width // VISION_HEAD_DIM),
                            image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6,
                            attention_dropout=0.0)


def _text_config(med: Mapping, encoder_width: int):
    from transformers.models.blip.modeling_blip_text import BlipTextConfig
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{NAME}: med_config position_embedding_type {med['position_embedding_type']!r} "
                          f"is not supported (BLIP uses 'absolute')")
    if not med.get("add_cross_attention", False):
        raise ConfigError(f"{NAME}: med_config must have add_cross_attention true")
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, eos_token_id=None, sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; forward(is_decoder=False) keeps the encoder mask
        use_cache=False)


def load_imagereward(checkpoint: str | Path, med_config: str | Path | Mapping, tokenizer_dir: str | Path,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     vision_heads: int | None = None) -> ImageRewardScorer:
    """The official ImageReward.pt (or .safetensors) + med_config.json + a bert-base-uncased folder -> scorer.

    Frozen and in eval mode. The vision/text towers run in `dtype`; the reward head stays float32 as in the
    package. `vision_heads` defaults to width // 64 (16 for ViT-L).
    """
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from hsd.io import load_weights

    checkpoint, tokenizer_dir = Path(checkpoint), Path(tokenizer_dir)
    missing = _missing_files(checkpoint, med_config, tokenizer_dir)
    if missing:
        raise MissingFileError(f"{NAME}: missing {'; '.join(missing)}. {NAME} needs ImageReward.pt, "
                               f"med_config.json and a bert-base-uncased tokenizer folder with vocab.txt "
                               f"(from THUDM/ImageReward and bert-base-uncased)")
    med = dict(med_config) if isinstance(med_config, Mapping) else json.loads(Path(med_config).read_text())
    sd = load_weights(checkpoint)
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]

    vcfg = _vision_config(sd, vision_heads)
    tcfg = _text_config(med, vcfg.hidden_size)
    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        vision = BlipVisionModel(vcfg)
        text = BlipTextModel(tcfg, add_pooling_layer=False)
        head = ScoreHead(tcfg.hidden_size)
    scorer = ImageRewardScorer(vision, text, head, _tokenizer(tokenizer_dir))

    names = imagereward_key_map(sd)
    mapped = {ours: sd[k] for k, ours in names.items() if ours is not None}
    expected = {k: v for k, v in scorer.state_dict().items()}
    unexpected = [k for k in sd if k not in names] + [k for k, ours in names.items()
                                                      if ours is not None and ours not in expected]
    absent = [k for k in expected if k not in mapped]
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in mapped and tuple(mapped[k].shape) != tuple(v.shape)]
    if unexpected or absent or wrong:
        raise ScorerWeightsError(f"{NAME}: {checkpoint} does not match the ImageReward layout"
                                 + (f"; missing (our names): {_few(absent)}" if absent else "")
                                 + (f"; unexpected: {_few(unexpected)}" if unexpected else "")
                                 + (f"; wrong shapes: {_few(wrong, 3)}" if wrong else ""))
    scorer.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True, assign=True)
    # a non-persistent buffer built on meta: the text position ids
    text.embeddings.position_ids = torch.arange(tcfg.max_position_embeddings).expand((1, -1))
    for name, buf in scorer.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"{NAME}: buffer {name} was not materialised")

    vocab = len(scorer.tokenizer)
    if vocab != tcfg.vocab_size:
        raise ScorerWeightsError(f"{NAME}: tokenizer has {vocab} tokens with [DEC] and [ENC] but med_config "
                                 f"vocab_size is {tcfg.vocab_size}: wrong bert-base-uncased folder or med_config.json")
    scorer.vision.to(dtype)
    scorer.text.to(dtype)
    return scorer.to(device).eval().requires_grad_(False)
