"""SD3 and FLUX (flow-matching transformers): their architectures, random-weight builders and the offline loader.

As for SD1.5/SDXL (hsd.models.components), the real configs are public facts (the SD3-medium and FLUX.1-dev
model_index folders), written here so that tests and `hsd memory` can build the true architectures with random
weights (on the meta device for the 2 B / 12 B transformers); tiny variants keep the same block types and
conditioning paths. A user's weights load from a local diffusers folder (`load_dit`), offline.

SD3 reads CLIP-L and CLIP-G (both with projections) and, optionally, T5-XXL: without T5 the pipeline's
`text_encoder_3=None` path pads the prompt with zeros, as diffusers does. FLUX.1-dev reads CLIP-L (its pooled output)
and T5-XXL (its tokens), both required. The conditioning is what each pipeline's own `encode_prompt` makes
(hsd.models.conditioning.PipelineText), so training sees what inference feeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

from ..io import atomic_dir
from .components import _CLIP_G, _CLIP_L, _TINY_CLIP, _VAE, ModelError, _load, build_tokenizer

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD3-medium's scheduler_config.json
_SD3_VAE = dict(_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)
# FLUX.1-dev's scheduler_config.json: the shift follows the packed image's token count (hsd.diffusion.schedule.flux_mu)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
# google/t5-v1_1-xxl's encoder (FLUX.1-dev's text_encoder_2): 4.76 B parameters
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6, tie_word_embeddings=False)
_TINY_T5 = dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8, tie_word_embeddings=False)


@dataclass(frozen=True)
class DiTArch:
    family: str                 # "sd3" | "flux"
    transformer: dict
    vae: dict
    text: tuple[dict, ...]      # SD3: CLIP-L and CLIP-G (with projections), optional T5; FLUX: CLIP-L and T5
    resolution: int
    scheduler: dict


DIT_ARCHS: dict[str, DiTArch] = {
    # stabilityai/stable-diffusion-3-medium-diffusers: 2.03 B transformer parameters, 24 joint blocks of width 1536
    "sd3": DiTArch("sd3", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192), _SD3_VAE, (dict(_CLIP_L, hidden_act="quick_gelu"), _CLIP_G, _T5_XXL), 1024,
        SD3_SCHEDULER),
    # diffusers' own tiny SD3 test config (tests/pipelines/stable_diffusion_3), two joint blocks
    "tiny-sd3": DiTArch("sd3", dict(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16),
        dict(_VAE, block_out_channels=(32, 64), layers_per_block=1, sample_size=16, latent_channels=4,
             scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        (_TINY_CLIP, dict(_TINY_CLIP, hidden_act="gelu"), dict(_TINY_T5, d_model=64)), 16, SD3_SCHEDULER),
    # black-forest-labs/FLUX.1-dev: 11.9 B transformer parameters, 19 double-stream and 38 single-stream blocks of
    # width 3072, the guidance embedding (guidance-distilled), 2x2 packing of 16-channel latents (in_channels 64)
    "flux": DiTArch("flux", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)),
        dict(_VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
             use_quant_conv=False, use_post_quant_conv=False),
        (_CLIP_L, _T5_XXL), 1024, FLUX_SCHEDULER),
    # after diffusers' tiny FLUX test config (tests/pipelines/flux): one block of each kind, 2x2 packing of 4 channels
    "tiny-flux": DiTArch("flux", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8)),
        dict(_VAE, block_out_channels=(32, 64), layers_per_block=1, sample_size=16, latent_channels=4,
             scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        (_TINY_CLIP, _TINY_T5), 16, FLUX_SCHEDULER),
}
FOLDERS = {"text": ("text_encoder", "text_encoder_2", "text_encoder_3"),
           "tokenizers": ("tokenizer", "tokenizer_2", "tokenizer_3")}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TRANSFORMERS = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}
# what each family's second encoder and tokenizer are (the first: CLIPTokenizer); model_index.json names them
_SECOND = {"sd3": (CLIPTextModelWithProjection, CLIPTokenizer), "flux": (T5EncoderModel, T5TokenizerFast)}
_FIRST = {"sd3": CLIPTextModelWithProjection, "flux": CLIPTextModel}


@dataclass
class DiTComponents:
    family: str                             # "sd3" | "flux"
    transformer: SD3Transformer2DModel | FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoders: list                     # SD3: CLIP-L, CLIP-G and, with model.t5, T5; FLUX: CLIP-L, T5
    tokenizers: list
    scheduler: FlowMatchEulerDiscreteScheduler

    @property
    def unet(self):
        """The denoiser, under the name the SD worlds' code reads (hsd.worlds.sd)."""
        return self.transformer

    def save_pretrained(self, path: str | Path) -> Path:
        """A diffusers StableDiffusion3Pipeline folder (text_encoder_3: null unless T5 is held) or a FluxPipeline
        folder, written atomically."""
        with atomic_dir(path) as tmp:
            for name, part in [("transformer", self.transformer), ("vae", self.vae), ("scheduler", self.scheduler),
                               *zip(FOLDERS["text"], self.text_encoders), *zip(FOLDERS["tokenizers"],
                                                                             self.tokenizers)]:
                part.save_pretrained(tmp / name)
            index = {"_class_name": PIPELINES[self.family], "_diffusers_version": "0.42.1",
                     "transformer": ["diffusers", TRANSFORMERS[self.family].__name__],
                     "vae": ["diffusers", "AutoencoderKL"],
                     "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
            if self.family == "sd3":
                t5 = len(self.text_encoders) == 3
                index |= {"text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
                          "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None]}
            # as the released folders name them (transformers 5 calls T5TokenizerFast T5Tokenizer; both load)
            second_tok = "T5TokenizerFast" if self.family == "flux" else "CLIPTokenizer"
            index |= {"text_encoder": ["transformers", _FIRST[self.family].__name__],
                      "tokenizer": ["transformers", "CLIPTokenizer"],
                      "text_encoder_2": ["transformers", _SECOND[self.family][0].__name__],
                      "tokenizer_2": ["transformers", second_tok]}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        return Path(path)


def build_t5_tokenizer(max_length: int = 512) -> T5TokenizerFast:
    """A character-level T5 (unigram) tokenizer with T5's special ids (pad 0, eos 1, unk 2): real T5 vocabularies are
    not on disk here. Enough for random-weight models; a user's folder brings its own."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    return T5TokenizerFast(vocab=pieces + [(chr(c), -3.0) for c in range(33, 127)], extra_ids=0,
                           model_max_length=max_length)


def build_dit(name: str, seed: int = 0, t5: bool = False) -> DiTComponents:
    """Random-weight components of a registered DiT architecture (`DIT_ARCHS`); `t5`: SD3 with its T5 encoder."""
    arch = DIT_ARCHS[name]
    torch.manual_seed(seed)
    tok = build_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n_clip = 2 if arch.family == "sd3" else 1  # FLUX's second encoder is T5
    clip = [CLIPTextConfig(**{"vocab_size": len(tok), **c, **ids}) for c in arch.text[:n_clip]]
    if arch.family == "sd3":
        encoders, toks = [CLIPTextModelWithProjection(c).eval() for c in clip], [tok, tok]
        if t5:
            t5_tok = build_t5_tokenizer()
            encoders.append(T5EncoderModel(T5Config(**{"vocab_size": len(t5_tok), **arch.text[2]})).eval())
            toks.append(t5_tok)
    else:
        t5_tok = build_t5_tokenizer()
        t5 = T5EncoderModel(T5Config(**{"vocab_size": len(t5_tok), **arch.text[1]}))
        encoders, toks = [CLIPTextModel(clip[0]).eval(), t5.eval()], [tok, t5_tok]
    return DiTComponents(arch.family, TRANSFORMERS[arch.family](**arch.transformer), AutoencoderKL(**arch.vae),
                         encoders, toks, FlowMatchEulerDiscreteScheduler(**arch.scheduler))


def is_dit_folder(path: Path) -> bool:
    return (Path(path) / "transformer").is_dir()


def image_tokens(vae, resolution: int) -> int:
    """The packed latent's token count at a square resolution (FLUX's 2x2 packing), from which a resolution-dependent
    shift follows; schedulers with a static shift ignore it."""
    return tokens_at(2 ** (len(vae.config.block_out_channels) - 1), resolution)


def tokens_at(downscale: int, resolution: int) -> int:
    """image_tokens from the VAE's downscale factor (a cache's manifest records it)."""
    side = resolution // downscale // 2
    return side * side


def dit_family(path: str | Path, expected: str | None = None) -> str:
    """"sd3" or "flux": what the folder's model_index.json says it holds; a one-line ModelError if it holds neither,
    or (with `expected`, the run's world) not that one."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    cls = json.loads(index.read_text()).get("_class_name")
    family = {v: k for k, v in PIPELINES.items()}.get(cls)
    if family is None or expected and family != expected:
        wanted = f"world {expected} expects a {PIPELINES[expected]}" if expected else \
            f"expected a {' or '.join(PIPELINES.values())}"
        raise ModelError(f"{path} holds a {cls}; {wanted} folder")
    return family


def load_dit(path: str | Path, family: str | None = None, t5: bool = False, transformer=None) -> DiTComponents:
    """An SD3 / SD3.5 folder (transformer/, vae/, the two CLIP encoders, and with `t5` its T5 encoder) or a FLUX.1
    folder (transformer/, vae/, CLIP-L and T5), offline. `family`: the one the run expects (a mismatch is a one-line
    error). Without `t5` an SD3 folder's T5 is not loaded: the pipeline's text_encoder_3=None path (docs/flow.md).
    `transformer`: one already loaded (not read again)."""
    path, found = Path(path), dit_family(path, family)
    (second, second_tok), first = _SECOND[found], _FIRST[found]
    enc = [_load(first, path, "text_encoder").eval(), _load(second, path, "text_encoder_2").eval()]
    toks = [_load(CLIPTokenizer, path, "tokenizer"), _load(second_tok, path, "tokenizer_2")]
    if t5 and found == "sd3":
        if not (path / "text_encoder_3").is_dir():
            raise ModelError(f"model.t5 / --t5: {path} has no text_encoder_3 folder (SD3's T5-XXL); expected one, or "
                             f"leave T5 off (the pipeline's text_encoder_3=None path)")
        enc.append(_load(T5EncoderModel, path, "text_encoder_3").eval())
        toks.append(_load(T5TokenizerFast, path, "tokenizer_3"))
    if transformer is None:
        transformer = _load(TRANSFORMERS[found], path, "transformer").eval()
    return DiTComponents(found, transformer,
                         _load(AutoencoderKL, path, "vae").eval(), enc, toks,
                         _load(FlowMatchEulerDiscreteScheduler, path, "scheduler"))


def load_transformer(path: str | Path, family: str):
    """(the transformer, the scheduler) alone: what a cached run (data.cache) loads to train."""
    path, found = Path(path), dit_family(path, family)
    return (_load(TRANSFORMERS[found], path, "transformer").eval(),
            _load(FlowMatchEulerDiscreteScheduler, path, "scheduler"))


def dit_pipeline(c: DiTComponents):
    """diffusers' StableDiffusion3Pipeline over these components (with T5 if they hold it), or its FluxPipeline."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    parts = dict(transformer=c.transformer, scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoders[0],
                 tokenizer=c.tokenizers[0], text_encoder_2=c.text_encoders[1], tokenizer_2=c.tokenizers[1])
    if c.family == "flux":
        return FluxPipeline(**parts)
    t5 = len(c.text_encoders) == 3
    return StableDiffusion3Pipeline(**parts, text_encoder_3=c.text_encoders[2] if t5 else None,
                                    tokenizer_3=c.tokenizers[2] if t5 else None)



__all__ = ["DIT_ARCHS", "DiTComponents", "ModelError", "build_dit", "dit_family", "dit_pipeline", "image_tokens",
           "is_dit_folder", "load_dit"]
