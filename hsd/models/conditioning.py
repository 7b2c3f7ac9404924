"""Raw image-text batches -> (latents, denoiser conditioning), as the SD1.5 / SDXL / SD3 / FLUX pipelines build them.

Conditioning is a dict of the denoiser's keyword arguments, so SD1.5 ({encoder_hidden_states}), SDXL
({encoder_hidden_states, added_cond_kwargs: {text_embeds, time_ids}}), SD3 ({encoder_hidden_states,
pooled_projections}) and FLUX (those and guidance) go through the same solver code.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class TextConditioner(nn.Module):
    """Frozen CLIP text encoder(s). SDXL: penultimate hidden states of both encoders concatenated, the
    second encoder's projected pooled output, and the six size numbers (original, crop top-left, target)."""

    def __init__(self, family: str, text_encoders: list, tokenizers: list):
        super().__init__()
        self.family, self.tokenizers = family, tokenizers
        self.encoders = nn.ModuleList(text_encoders).requires_grad_(False).eval()
        self._empty: Tensor | None = None  # SD1.5's empty-prompt embedding, encoded once per device

    def _ids(self, tok, captions: list[str]) -> Tensor:
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.encoders[0].device)

    @torch.no_grad()
    def forward(self, captions: list[str], original_size: Tensor | None = None,
                crop_top_left: Tensor | None = None, target_size: tuple[int, int] = (1024, 1024)) -> dict:
        if self.family == "sd15":
            return {"encoder_hidden_states": self.encoders[0](self._ids(self.tokenizers[0], captions))[0]}
        hidden, pooled = [], None
        for enc, tok in zip(self.encoders, self.tokenizers):
            out = enc(self._ids(tok, captions), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
        B = len(captions)
        orig = torch.as_tensor(target_size).expand(B, 2) if original_size is None else original_size
        crop = torch.zeros(B, 2, dtype=torch.long) if crop_top_left is None else crop_top_left
        time_ids = torch.cat([orig, crop, torch.as_tensor(target_size).expand(B, 2)], 1).to(pooled)
        return {"encoder_hidden_states": torch.cat(hidden, -1),
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def uncond(self, cond: dict) -> dict:
        """SD1.5: the empty prompt's embedding. SDXL: zeros for text (force_zeros_for_empty_prompt, as the
        SDXL pipeline and the LCM-LoRA SDXL script do), the same size numbers."""
        B = cond["encoder_hidden_states"].shape[0]
        if self.family == "sd15":  # constant: encoded once, then broadcast
            if self._empty is None or self._empty.device != cond["encoder_hidden_states"].device:
                self._empty = self([""])["encoder_hidden_states"]
            return {"encoder_hidden_states": self._empty.expand(B, -1, -1)}
        return sdxl_uncond(cond)


def sdxl_uncond(cond: dict) -> dict:
    """SDXL's empty prompt: zeros for the text (force_zeros_for_empty_prompt), the sample's own size numbers."""
    add = cond["added_cond_kwargs"]
    return {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
            "added_cond_kwargs": {"text_embeds": torch.zeros_like(add["text_embeds"]), "time_ids": add["time_ids"]}}


def expand_empty(empty: dict, batch: int, device) -> dict:
    """The empty prompt's conditioning (one sample, a dict of tensors) for a batch, on `device`."""
    return {k: v.to(device).expand(batch, *v.shape[1:]) for k, v in empty.items()}


class PipelineText(nn.Module):
    """SD3's and FLUX's conditioning, made by the pipeline's own `encode_prompt`, so that training sees exactly what
    inference feeds. SD3: CLIP-L and CLIP-G penultimate states side by side, zero-padded to the joint width, then T5's
    tokens or, without T5, zeros; the two pooled outputs side by side. FLUX: T5's tokens (padded to 512, FluxPipeline's
    max_sequence_length, which `hsd generate` keeps: the padding tokens are attended to), CLIP-L's pooled output, and
    the guidance value its embedding takes (guidance-distilled: FLUX.1-dev's pipeline default 3.5, the release's
    Hyper-FLUX guidance; TSCD and DMD set their own, hsd.diffusion.solvers.with_guidance). The empty prompt is
    encoded, not zeroed, as both pipelines do."""

    def __init__(self, components, guidance: float = 3.5):
        super().__init__()
        from .dit import dit_pipeline
        self.encoders = nn.ModuleList(components.text_encoders).requires_grad_(False).eval()
        self.pipe = dit_pipeline(components)  # not a Module: its transformer is not registered here twice
        self.flux, self.guidance = components.family == "flux", guidance
        self._empty: dict | None = None

    @torch.no_grad()
    def forward(self, captions: list[str], original_size: Tensor | None = None, crop_top_left: Tensor | None = None,
                target_size: tuple[int, int] = (1024, 1024)) -> dict:
        device = self.encoders[0].device
        if self.flux:
            emb, pooled, _ = self.pipe.encode_prompt(list(captions), None, device=device,
                                                     max_sequence_length=512)
            return {"encoder_hidden_states": emb, "pooled_projections": pooled,
                    "guidance": torch.full((len(captions),), self.guidance, device=device)}
        emb, _, pooled, _ = self.pipe.encode_prompt(list(captions), None, None, device=device,
                                                    do_classifier_free_guidance=False)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def uncond(self, cond: dict) -> dict:
        B, device = cond["pooled_projections"].shape[0], cond["pooled_projections"].device
        if self._empty is None or self._empty["pooled_projections"].device != device:
            self._empty = self([""])
        return expand_empty(self._empty, B, device)


@torch.no_grad()
def vae_encode(vae, pixels: Tensor, g: torch.Generator) -> Tensor:
    """Pixels in [-1, 1] -> scaled latents sampled with `g` (float32). The VAE runs outside autocast in its own
    dtype: SDXL's VAE overflows in fp16/bf16 (force_upcast)."""
    with torch.autocast(pixels.device.type, enabled=False):
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    z, shift = dist.sample(generator=g), vae.config.get("shift_factor")  # SD3 / FLUX VAEs shift, then scale
    return ((z - shift if shift else z) * vae.config.scaling_factor).float()


class LatentEncoder(nn.Module):
    """{pixels in [-1, 1] | latents, captions, sizes} -> {x0 latents, cond, uncond}; everything frozen."""

    def __init__(self, vae, text: TextConditioner, resolution: int, vae_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval().to(vae_dtype)
        self.text, self.resolution = text, resolution

    @torch.no_grad()
    def forward(self, batch: dict, g: torch.Generator) -> dict:
        x0 = batch["latents"] if "latents" in batch else vae_encode(self.vae, batch["pixels"], g)  # or offline
        cond = self.text(batch["captions"], batch.get("original_size"), batch.get("crop_top_left"),
                         (self.resolution, self.resolution))
        return {**batch, "x0": x0.float(), "cond": cond, "uncond": self.text.uncond(cond)}
