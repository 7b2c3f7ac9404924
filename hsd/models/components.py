"""SD1.5 / SDXL components: builders for the real architectures and tiny variants, and the offline loader.

The real configs are public facts (the SD1.5 and SDXL base model_index folders); they are written here so
that tests and benchmarks can build the true architectures with random weights, since no hub is reachable.
A user's weights load through `load_components`, from a local diffusers folder or a single-file checkpoint.
"""
from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import HsdError
from ..io import atomic_dir

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, vocab_size=49408)
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, vocab_size=49408)
_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=32)


@dataclass(frozen=True)
class Arch:
    """Everything needed to build one architecture with random weights."""
    family: str                       # "sd15" | "sdxl": which pipeline and conditioning it uses
    unet: dict
    vae: dict
    text: tuple[dict, ...]            # one CLIP text config per encoder (SDXL: the second has a projection)
    resolution: int                   # the native image size in pixels
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER))


ARCHS: dict[str, Arch] = {
    "sd15": Arch("sd15", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        dict(_VAE, sample_size=512, scaling_factor=0.18215), (_CLIP_L,), 512),
    "sdxl": Arch("sdxl", dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        (dict(_CLIP_L, hidden_act="quick_gelu"), _CLIP_G), 1024),
    # Tiny variants: the same block types and conditioning paths, a few hundred thousand parameters.
    "tiny-sd15": Arch("sd15", dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=32,
        block_out_channels=(32, 64), attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        dict(_VAE, block_out_channels=(32, 64), layers_per_block=1, sample_size=16, scaling_factor=0.18215,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        (_TINY_CLIP,), 16),
    "tiny-sdxl": Arch("sdxl", dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=64,
        block_out_channels=(32, 64), attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
        dict(_VAE, block_out_channels=(32, 64), layers_per_block=1, sample_size=16, scaling_factor=0.13025,
             force_upcast=True, down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2),
        (_TINY_CLIP, dict(_TINY_CLIP, hidden_act="gelu")), 16),
}


class ModelError(HsdError, ValueError):
    """A model path or architecture that cannot serve the run (missing folder, SDXL settings on SD1.5...)."""


@dataclass
class Components:
    family: str                        # "sd15" | "sdxl"
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list                # CLIPTextModel (+ CLIPTextModelWithProjection for SDXL)
    tokenizers: list[CLIPTokenizer]
    scheduler: DDIMScheduler

    def save_pretrained(self, path: str | Path) -> Path:
        """A diffusers pipeline folder (model_index.json + subfolders) that `load_components` reads back, written
        atomically (a failed or killed write keeps the folder that was there)."""
        with atomic_dir(path) as tmp:
            self._save(tmp)
        return Path(path)

    def _save(self, path: Path) -> None:
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        toks = ["tokenizer", "tokenizer_2"][: len(self.tokenizers)]
        for name, part in [("unet", self.unet), ("vae", self.vae), ("scheduler", self.scheduler),
                           *zip(names, self.text_encoders), *zip(toks, self.tokenizers)]:
            part.save_pretrained(path / name)
        index = {"_class_name": PIPELINES[self.family], "_diffusers_version": "0.42.1",
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", "DDIMScheduler"]}
        index.update({n: ["transformers", type(m).__name__] for n, m in zip(names, self.text_encoders)})
        index.update({n: ["transformers", "CLIPTokenizer"] for n in toks})
        if self.family == "sdxl":
            index["force_zeros_for_empty_prompt"] = True
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (path / "model_index.json").write_text(json.dumps(index, indent=2))


PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def build_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer without merges: real CLIP vocabularies are not on disk here.

    Enough for random-weight models; a user's tokenizer folder is loaded instead by `load_components`.
    """
    chars = [chr(c) for c in range(33, 127)]
    special = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + special)}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=max_length,
                             pad_token="<|endoftext|>")


def build_components(name: str, seed: int = 0) -> Components:
    """Random-weight components of a registered architecture (`ARCHS`)."""
    if name not in ARCHS:
        raise ModelError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    arch = ARCHS[name]
    torch.manual_seed(seed)
    tok = build_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    configs = [CLIPTextConfig(**{"vocab_size": len(tok), **cfg, **ids}) for cfg in arch.text]
    encoders = [CLIPTextModel(configs[0])] + [CLIPTextModelWithProjection(c) for c in configs[1:]]
    return Components(arch.family, UNet2DConditionModel(**arch.unet), AutoencoderKL(**arch.vae),
                      [e.eval() for e in encoders], [tok] * len(encoders), DDIMScheduler(**arch.scheduler))


def family_of(unet_config) -> str:
    """SDXL UNets take pooled text + size embeddings ("text_time"); SD1.5 UNets take none."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def check_family(components: Components, expected: str, where: str) -> None:
    actual = components.family
    if actual != expected:
        cfg = components.unet.config
        raise ModelError(
            f"{where} holds {actual.upper()} weights (UNet cross_attention_dim={cfg.cross_attention_dim}, "
            f"addition_embed_type={cfg.addition_embed_type}, {len(components.text_encoders)} text encoder(s)) "
            f"but the run asks for {expected.upper()} (world: {expected}); set world: {actual} or use "
            f"{expected.upper()} weights")


def load_components(path: str | Path, vae: str | Path = "", config: str | Path = "", unet=None) -> Components:
    """Load from a local diffusers folder (model_index.json) or a single-file .safetensors/.ckpt, offline.

    `vae` optionally replaces the VAE (e.g. an fp16-fixed SDXL VAE folder). A single file needs `config`:
    a diffusers folder with the configs and tokenizers, since the hub that usually supplies them is not
    reachable. `unet`: one already loaded (a folder's is not read again).
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path} (expected a diffusers folder with model_index.json, "
                         f"or a single-file .safetensors checkpoint)")
    comps = _from_single_file(path, config) if path.is_file() else _from_folder(path, unet)
    if vae:
        comps.vae = _load(AutoencoderKL, Path(vae), None)
    return comps


def _from_folder(path: Path, unet=None) -> Components:
    check_folder(path)
    unet = _load(UNet2DConditionModel, path, "unet") if unet is None else unet
    family = family_of(unet.config)
    n = 2 if family == "sdxl" else 1
    enc = [_load(CLIPTextModel, path, "text_encoder")]
    if n == 2:
        enc.append(_load(CLIPTextModelWithProjection, path, "text_encoder_2"))
    toks = [_load(CLIPTokenizer, path, sub) for sub in ["tokenizer", "tokenizer_2"][:n]]
    sched = _load(DDIMScheduler, path, "scheduler")
    return Components(family, unet.eval(), _load(AutoencoderKL, path, "vae").eval(), [e.eval() for e in enc],
                      toks, sched)


def check_folder(path: Path) -> None:
    if not (path / "model_index.json").exists():
        raise ModelError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")


def load_unet(path: str | Path, config: str | Path = ""):
    """(the UNet, the scheduler) alone: what a cached run (data.cache) loads to train."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path} (expected a diffusers folder with model_index.json, "
                         f"or a single-file .safetensors checkpoint)")
    if path.is_file():
        c = _from_single_file(path, config)
        return c.unet, c.scheduler
    check_folder(path)
    return _load(UNet2DConditionModel, path, "unet").eval(), _load(DDIMScheduler, path, "scheduler")


def _load(cls, path: Path, sub: str | None):
    folder = path / sub if sub else path
    if not folder.is_dir():
        raise ModelError(f"{folder} not found: {cls.__name__} weights are expected there")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars per text encoder: noise in a training log
    with loading(cls.__name__, folder):
        return cls.from_pretrained(folder, local_files_only=True)


@contextmanager
def loading(what: str, where: Path):
    """What diffusers and transformers raise for a torn or foreign config.json or weights file, as one line."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot load {what} from {where}: {first[:300]}") from e


def _from_single_file(path: Path, config: str | Path) -> Components:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if not config:
        raise ModelError(f"{path} is a single-file checkpoint: set model.config to a local diffusers folder "
                         f"with its configs and tokenizers (no model hub is reachable to fetch them)")
    unet_config = Path(config) / "unet" / "config.json"
    if not unet_config.is_file():
        raise ModelError(f"model.config {config} is not a diffusers folder: {unet_config} is missing (expected the "
                         f"configs and tokenizers of the checkpoint's model, e.g. its diffusers pipeline folder)")
    with loading("the model's configs", unet_config):
        family = family_of(json.loads(unet_config.read_text()))
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with loading("a single-file checkpoint", path):
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True)
    enc = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    return Components(family, pipe.unet, pipe.vae, enc, toks, DDIMScheduler.from_config(pipe.scheduler.config))


def pipeline(components: Components):
    """The stock diffusers text-to-image pipeline over these components (no safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    c = components
    if c.family == "sdxl":
        return StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
                                         tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.unet,
                                         scheduler=c.scheduler)
    return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                   unet=c.unet, scheduler=c.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
