"""SD3 and FLUX (flow-matching transformers): their architectures, random-weight builders and the offline loader.

As for SD1.5/SDXL (hsd.models.components), the real configs are public facts (the SD3-medium and FLUX.1-dev
model_index folders), written here so that tests and `hsd memory` can build the true architectures with random
weights (on the meta device for the 2 B / 12 B transformers); tiny variants keep the same block types and
conditioning paths. A user's weights load from a local diffusers folder (`load_dit`), offline.

SD3 reads CLIP-L and CLIP-G (both with projections) and, optionally, T5-XXL: without T5 the pipeline's
`text_encoder_3=None` path pads the prompt with zeros, as diffusers does. The conditioning is what the pipeline's
own `encode_prompt` makes (hsd.models.conditioning.PipelineText), so training sees what inference feeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from ..io import atomic_dir
from .components import _CLIP_G, _CLIP_L, _TINY_CLIP, _VAE, ModelError, _load, build_tokenizer

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD3-medium's scheduler_config.json
_SD3_VAE = dict(_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)


@dataclass(frozen=True)
class DiTArch:
    family: str                 # "sd3"
    transformer: dict
    vae: dict
    text: tuple[dict, ...]      # the CLIP text configs (both with projections)
    resolution: int
    scheduler: dict


DIT_ARCHS: dict[str, DiTArch] = {
    # stabilityai/stable-diffusion-3-medium-diffusers: 2.03 B transformer parameters, 24 joint blocks of width 1536
    "sd3": DiTArch("sd3", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192), _SD3_VAE, (dict(_CLIP_L, hidden_act="quick_gelu"), _CLIP_G), 1024,
        SD3_SCHEDULER),
    # diffusers' own tiny SD3 test config (tests/pipelines/stable_diffusion_3), two joint blocks
    "tiny-sd3": DiTArch("sd3", dict(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16),
        dict(_VAE, block_out_channels=(32, 64), layers_per_block=1, sample_size=16, latent_channels=4,
             scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        (_TINY_CLIP, dict(_TINY_CLIP, hidden_act="gelu")), 16, SD3_SCHEDULER),
}
FOLDERS = {"text": ("text_encoder", "text_encoder_2"), "tokenizers": ("tokenizer", "tokenizer_2")}


@dataclass
class DiTComponents:
    family: str                             # "sd3"
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    text_encoders: list                     # CLIP-L, CLIP-G (CLIPTextModelWithProjection); T5 is not held
    tokenizers: list[CLIPTokenizer]
    scheduler: FlowMatchEulerDiscreteScheduler

    @property
    def unet(self):
        """The denoiser, under the name the SD worlds' code reads (hsd.worlds.sd)."""
        return self.transformer

    def save_pretrained(self, path: str | Path) -> Path:
        """A diffusers StableDiffusion3Pipeline folder without T5 (text_encoder_3: null), written atomically."""
        with atomic_dir(path) as tmp:
            for name, part in [("transformer", self.transformer), ("vae", self.vae), ("scheduler", self.scheduler),
                               *zip(FOLDERS["text"], self.text_encoders), *zip(FOLDERS["tokenizers"],
                                                                             self.tokenizers)]:
                part.save_pretrained(tmp / name)
            index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
                     "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                     "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                     "text_encoder_3": [None, None], "tokenizer_3": [None, None]}
            index.update({n: ["transformers", "CLIPTextModelWithProjection"] for n in FOLDERS["text"]})
            index.update({n: ["transformers", "CLIPTokenizer"] for n in FOLDERS["tokenizers"]})
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        return Path(path)


def build_dit(name: str, seed: int = 0) -> DiTComponents:
    """Random-weight components of a registered DiT architecture (`DIT_ARCHS`)."""
    arch = DIT_ARCHS[name]
    torch.manual_seed(seed)
    tok = build_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**{"vocab_size": len(tok), **c, **ids})).eval()
                for c in arch.text]
    return DiTComponents(arch.family, SD3Transformer2DModel(**arch.transformer), AutoencoderKL(**arch.vae),
                         encoders, [tok] * len(encoders), FlowMatchEulerDiscreteScheduler(**arch.scheduler))


def is_dit_folder(path: Path) -> bool:
    return (Path(path) / "transformer").is_dir()


def load_dit(path: str | Path) -> DiTComponents:
    """An SD3 / SD3.5 diffusers folder (model_index.json, transformer/, vae/, the two CLIP encoders), offline. A T5
    encoder in the folder is not loaded: hsd trains on the pipeline's text_encoder_3=None path (docs/flow.md)."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    cls = json.loads(index.read_text()).get("_class_name")
    if cls != "StableDiffusion3Pipeline":
        raise ModelError(f"{path} holds a {cls}; world sd3 expects a StableDiffusion3Pipeline folder")
    enc = [_load(CLIPTextModelWithProjection, path, sub).eval() for sub in FOLDERS["text"]]
    toks = [_load(CLIPTokenizer, path, sub) for sub in FOLDERS["tokenizers"]]
    return DiTComponents("sd3", _load(SD3Transformer2DModel, path, "transformer").eval(),
                         _load(AutoencoderKL, path, "vae").eval(), enc, toks,
                         _load(FlowMatchEulerDiscreteScheduler, path, "scheduler"))


def sd3_pipeline(c: DiTComponents):
    """diffusers' StableDiffusion3Pipeline over these components, without T5."""
    from diffusers import StableDiffusion3Pipeline
    return StableDiffusion3Pipeline(transformer=c.transformer, scheduler=c.scheduler, vae=c.vae,
                                    text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                    text_encoder_2=c.text_encoders[1], tokenizer_2=c.tokenizers[1],
                                    text_encoder_3=None, tokenizer_3=None)


__all__ = ["DIT_ARCHS", "DiTComponents", "ModelError", "build_dit", "is_dit_folder", "load_dit", "sd3_pipeline"]
