"""The lab's "pretrained teacher": a small diffusers denoiser fitted to the exact network output of its family.

VP worlds (digits, blocks): a UNet2DConditionModel fitted to the exact eps, with SD's DDIM schedule. Flow worlds
(digits-flow): diffusers' own SD3Transformer2DModel (2x2 patches over the 8x8 image, joint attention with the
prompt's tokens, the pooled prompt through its AdaLN) fitted to the exact velocity, with SD3's flow-matching
scheduler (static shift 3.0). It is saved as a diffusers-format folder (unet/ or transformer/, text_encoder/,
tokenizer/, scheduler/), the layout of a user's SD1.5 or SD3 folder, and loaded through the same from_pretrained
calls. The text side is a tiny character-level CLIP tokenizer and a frozen random CLIPTextModel: the denoiser
learns to read its embeddings through attention, as SD's UNet and SD3's transformer read CLIP's.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from ..diffusion.schedule import NoiseSchedule
from ..diffusion.solvers import index_cond
from ..models.denoisers import denoiser_out
from ..errors import MissingFileError
from ..io import atomic_dir
from ..names import DEFAULT_LAB_WORLD, LAB_WORLDS
from .world import LabWorld

TEACHERS = Path(__file__).parent / "teachers"  # one shipped teacher folder per named world
DEFAULT_WORLD = DEFAULT_LAB_WORLD
FLOW_SHIFT = 3.0  # SD3's static shift (its scheduler config); headroom at it: docs/flow.md
NETS = {"vp": ("unet", UNet2DConditionModel), "flow": ("transformer", SD3Transformer2DModel)}  # folder, class
SCHEDULERS = {"vp": DDIMScheduler, "flow": FlowMatchEulerDiscreteScheduler}
MAKE_COMMAND = "hsd lab-teacher"
CHARS = "abcdefghijklmnopqrstuvwxyz"
MAX_LEN = 16


def teacher_path(world: str = DEFAULT_WORLD) -> Path:
    """The shipped teacher folder of a named world."""
    return TEACHERS / world


class MissingTeacherError(MissingFileError):
    pass


def lab_scheduler(family: str = "vp"):
    """vp: SD's scaled_linear schedule, T = 1000, the final step landing on clean data (alpha-bar = 1). flow: SD3's
    flow-matching Euler scheduler (T = 1000, static shift FLOW_SHIFT)."""
    if family == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                         num_train_timesteps=1000)


def build_unet(size: int = 8, channels: int = 3) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def build_transformer(size: int = 8, channels: int = 1) -> SD3Transformer2DModel:
    """SD3's MMDiT at lab scale: 2x2 patches (16 tokens on 8x8), 4 joint blocks of width 64, 0.58 M parameters
    (the digits UNet: 0.98 M); reads the 32-wide prompt tokens and the pooled prompt as SD3 reads CLIP's."""
    return SD3Transformer2DModel(
        sample_size=size, patch_size=2, in_channels=channels, out_channels=channels, num_layers=4,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
        pooled_projection_dim=32, pos_embed_max_size=size // 2)


def build_denoiser(family: str, size: int, channels: int):
    return build_transformer(size, channels) if family == "flow" else build_unet(size, channels)


def build_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges) over a-z."""
    with tempfile.TemporaryDirectory() as tmp:
        return _clip_tokenizer(Path(tmp))


def _clip_tokenizer(folder: Path) -> CLIPTokenizer:
    special = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(list(CHARS) + [c + "</w>" for c in CHARS] + special)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LEN,
                         pad_token="<|endoftext|>")


def build_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_LEN, projection_dim=32,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(cfg).eval()


@dataclass
class Teacher:
    unet: UNet2DConditionModel | SD3Transformer2DModel  # the denoiser: UNet (vp) or transformer (flow)
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler | FlowMatchEulerDiscreteScheduler
    world: LabWorld

    @property
    def family(self) -> str:
        return "flow" if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler) else "vp"

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        """The denoiser's conditioning, made the way its pipeline makes it (padded to max length): the prompt tokens
        [B, L, 32] (UNet), or those and the pooled prompt [B, 32] as SD3's keyword arguments (transformer)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_LEN, truncation=True,
                             return_tensors="pt").input_ids
        out = self.text_encoder(ids)
        if self.family == "vp":
            return out.last_hidden_state
        return {"encoder_hidden_states": out.last_hidden_state, "pooled_projections": out.pooler_output}


def load_teacher(path: str | os.PathLike | None = None, expected: str | None = None) -> Teacher:
    """A fitted teacher folder (default: the shipped one of the default world) and the world it was fitted to.
    `expected` (the run's family, vp or flow) only names the denoiser folder a missing teacher lacks."""
    path = Path(path) if path is not None else teacher_path()
    family = next((f for f, (sub, _) in NETS.items() if (path / sub / "config.json").exists()), None)
    if family is None or not (path / "world.safetensors").exists():
        net = f"{NETS[expected][0]}/" if expected in NETS else " or ".join(f"{sub}/" for sub, _ in NETS.values())
        raise MissingTeacherError(f"lab teacher not found at {path} (it needs {net} and world.safetensors); make it "
                                  f"with `{MAKE_COMMAND} --world NAME --out {path}`")
    hf_logging.disable_progress_bar()  # a "Loading weights" bar for a 36-tensor text encoder is noise
    sub, cls = NETS[family]
    return Teacher(cls.from_pretrained(path / sub).eval(),
                   CLIPTextModel.from_pretrained(path / "text_encoder").eval(),
                   CLIPTokenizer.from_pretrained(path / "tokenizer"),
                   SCHEDULERS[family].from_pretrained(path / "scheduler"),
                   LabWorld.load(path / "world.safetensors"))


def fit_teacher(world: LabWorld, steps: int = 4000, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                uncond_prob: float = 0.2, log_every: int = 100) -> Teacher:
    """Regress the denoiser onto the exact output of the world's family (hsd.names.LAB_WORLDS): eps or velocity,
    conditional, or unconditional for dropped prompts."""
    tok, family = build_tokenizer(), LAB_WORLDS.get(world.name, "vp")
    torch.manual_seed(seed)  # the denoiser's initialisation too: a fit is a function of its seed
    teacher = Teacher(build_denoiser(family, world.size, world.shape[0]), build_text_encoder(len(tok)), tok,
                      lab_scheduler(family), world)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    emb = teacher.encode(world.prompts + [""])  # [C + 1, L, 32]; the last row is the empty prompt
    sched = NoiseSchedule.from_scheduler(teacher.scheduler)
    opt = torch.optim.AdamW(teacher.unet.parameters(), lr=lr, weight_decay=0.0)
    lr_at = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    teacher.unet.train()
    for step in range(steps):
        labels = torch.randint(world.n_classes, (batch,), generator=g)
        drop = torch.rand(batch, generator=g) < uncond_prob
        t = torch.randint(sched.T, (batch,), generator=g)
        a, s = sched.coeffs(t, torch.zeros(batch, 1, 1, 1, dtype=torch.float64))
        x_t = a * world.sample(labels, g) + s * torch.randn(batch, *world.shape, generator=g, dtype=torch.float64)
        target = torch.where(drop[:, None, None, None], world.out(x_t, a.flatten(), s.flatten(), None, family),
                             world.out(x_t, a.flatten(), s.flatten(), labels, family))
        cond = index_cond(emb, torch.where(drop, world.n_classes, labels))
        pred = denoiser_out(teacher.unet, x_t.float(), sched.model_time(t), cond)
        loss = torch.nn.functional.mse_loss(pred, target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_at.step()
        if log_every and step % log_every == 0:
            print(f"teacher fit step {step}/{steps} {'eps' if family == 'vp' else 'velocity'}-mse "
                  f"{loss.item():.5f}", flush=True)
    teacher.unet.eval()
    return teacher


def save_teacher(teacher: Teacher, path: str | os.PathLike) -> Path:
    """Write the diffusers folder atomically: a temp sibling renamed into place."""
    with atomic_dir(path) as tmp:
        teacher.unet.save_pretrained(tmp / NETS[teacher.family][0])
        teacher.text_encoder.save_pretrained(tmp / "text_encoder")
        teacher.tokenizer.save_pretrained(tmp / "tokenizer")
        teacher.scheduler.save_pretrained(tmp / "scheduler")
        teacher.world.save(tmp / "world.safetensors")
    return Path(path)
