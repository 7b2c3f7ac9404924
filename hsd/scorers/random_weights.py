"""Random-weight scorer files in the official layouts: what tests, the benchmark and the notebook load in
place of the real checkpoints, which no hub can supply here. "real" gives the real architectures (about 7 GB);
"tiny" keeps every layout and key name but few, narrow layers."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import clip
from .heads import ScoreHead
from .scorers import AES_HEAD

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the backbone PickScore_v1 fine-tunes
PICKSCORE_REAL = dict(projection_dim=1024,
                      text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                       num_hidden_layers=24, hidden_act="gelu"),
                      vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                                         num_hidden_layers=32, patch_size=14, image_size=224, hidden_act="gelu"))
PICKSCORE_TINY = dict(projection_dim=64,
                      text_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                       num_hidden_layers=2, hidden_act="gelu"),
                      vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                         num_hidden_layers=2, patch_size=32, image_size=224, hidden_act="gelu"))
CLIP_ARCH = {"real": ("ViT-B-32-quickgelu", "ViT-L-14-quickgelu"),
             "tiny": (clip.TINY, {**clip.TINY, "embed_dim": 768})}   # the aesthetic head reads 768 features
BERT_REAL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
BERT_TINY = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=256)


def write_random_scorers(out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    out = Path(out)
    b32, l14 = CLIP_ARCH[size]
    clip.save_clip(clip.build_clip(b32, seed), b32, out / "clip")
    clip.save_clip(clip.build_clip(l14, seed + 1), l14, out / "aesthetic" / "clip")
    torch.manual_seed(seed + 2)
    torch.save(ScoreHead().state_dict(), out / "aesthetic" / AES_HEAD)
    write_random_pickscore(out / "pickscore", PICKSCORE_REAL if size == "real" else PICKSCORE_TINY, seed + 3)
    write_random_imagereward(out / "imagereward", size, seed + 4)
    return out


def write_random_pickscore(folder: Path, cfg: dict, seed: int) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    torch.manual_seed(seed)
    config = CLIPConfig(projection_dim=cfg["projection_dim"], text_config=cfg["text_config"],
                        vision_config=cfg["vision_config"])
    CLIPModel(config).save_pretrained(folder / "model")
    tok = CLIPTokenizer.from_pretrained(clip.write_hf_tokenizer(folder / "processor"))
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok).save_pretrained(folder / "processor")
    return folder


def write_random_imagereward(folder: Path, size: str, seed: int) -> Path:
    from .imagereward import med_config_for, random_imagereward_state_dict, write_bert_vocab
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_bert_vocab(folder / "bert-base-uncased")
    med = med_config_for(vocab_size=vocab + 2, **(BERT_REAL if size == "real" else BERT_TINY))
    (folder / "med_config.json").write_text(json.dumps(med, indent=1))
    vision = None if size == "real" else dict(width=64, depth=2)
    torch.save(random_imagereward_state_dict(med, seed, vision=vision), folder / "ImageReward.pt")
    return folder
