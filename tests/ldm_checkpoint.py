"""Write SD1.5 components as an original (LDM / CompVis) single-file checkpoint, for testing the single-file loader.

No such file can be downloaded here, so the test makes one: diffusers' own fixed-layer table
(DIFFUSERS_TO_LDM_MAPPING) plus the block numbering its `convert_ldm_*_checkpoint` functions undo.
"""
from __future__ import annotations

import re

from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}" if head != "conv_shortcut" else f"skip_connection.{tail}"


def unet_key(k: str, lpb: int, up_has_attn: set[int]) -> str:
    n = lpb + 1
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", k):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", k):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
        b = int(m[1])
        return f"output_blocks.{b * n + lpb}.{2 if b in up_has_attn else 1}.conv.{m[2]}"
    raise KeyError(k)


def vae_key(k: str, n_up: int) -> str:
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", k):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", k):
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
    raise KeyError(k)


def sd15_to_ldm(components) -> dict:
    """{LDM key: tensor} for an SD1.5-family Components (UNet, VAE, CLIP text encoder)."""
    unet, vae = components.unet, components.vae
    fixed_u, fixed_v = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], DIFFUSERS_TO_LDM_MAPPING["vae"]
    up_attn = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    out = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + (fixed_u.get(k) or unet_key(k, unet.config.layers_per_block, up_attn))] = v
    for k, v in vae.state_dict().items():
        key = fixed_v.get(k) or vae_key(k, len(vae.config.up_block_types))
        out["first_stage_model." + key] = v[..., None, None] if ".mid.attn_1." in key and v.dim() == 2 else v
    for k, v in components.text_encoders[0].state_dict().items():
        out["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
    return {k: v.contiguous() for k, v in out.items()}
