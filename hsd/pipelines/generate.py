"""`hsd generate`: images from a Hyper-SD model with its release recipes, on stock diffusers pipelines.

The recipes are the Hyper-SD README's (schedulers built from the model's own scheduler config):
  ddim     N-step LoRAs: DDIM with "trailing" spacing (so one step runs at t=999), no CFG.
  tcd      the unified 1-8 step LoRA: TCD with eta (1.0 at one step; lower keeps more detail over more steps).
  lcm      the one-step UNet (--unet): LCM at timestep 800, the timestep it was trained at.
  euler    flow-matching models (SD3, FLUX): FlowMatchEuler on the trailing sigmas linspace(1, 1/k, k) (the N-step
           LoRAs' recipe there; "ddim" on SD3 means the same).
  default  the model's scheduler, untouched.
`--preset` names a release recipe (PRESETS: steps, guidance, LoRA scale), e.g. hyper-sd3-8: 8 steps, CFG 5, the
release's LoRA fused at 0.125, as the Hyper-SD README gives it (hsd's own files store their alpha: fused at 1).
Any recipe also runs under a ControlNet (--controlnet, --control-image): diffusers' ControlNet pipeline built over
the same loaded modules, the LoRAs already fused into its UNet (hsd/pipelines/controlnet.py).
torch and diffusers are imported inside the functions: the main CLI builds this parser on every call,
and `hsd --help` should not pay seconds of imports.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..io import atomic_path, check_output
from .controlnet import CONTROLNET_FOLDER, FAMILY_NAMES, IMAGE_FILE
from .recipes import PRESETS, GenerateError, apply_preset, model_family, recipe_scheduler

SCHEDULERS = ("ddim", "tcd", "lcm", "euler", "default")
FLOW_SCHEDULERS = ("ddim", "euler", "default")  # a flow-matching model has no TCD or LCM scheduler in diffusers
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_ETA = {"tcd": 1.0}              # every other eta-taking scheduler: 0.0, i.e. deterministic DDIM
ONE_STEP_TIMESTEPS = {"lcm": [800]}     # more steps use the scheduler's own spacing
LORA_LAYOUTS = ("safetensors in the diffusers layout ('unet.<module>.lora_A.weight', 'transformer.<module>...' for "
                "SD3 and FLUX) or the kohya layout ('lora_unet_<module>.lora_down.weight')")
OTHER_ARCH = "the LoRA was trained for another architecture (e.g. an SD1.5 LoRA on an SDXL model)"


def pipe_denoiser(pipe):
    """A diffusers pipeline's denoiser: its UNet (SD1.5, SDXL) or its transformer (SD3, FLUX)."""
    return getattr(pipe, "unet", None) or pipe.transformer


@dataclass
class ImageGenerator:
    pipe: object          # diffusers StableDiffusion(XL)(ControlNet)Pipeline: LoRAs fused, recipe scheduler set
    scheduler: str        # recipe name, one of SCHEDULERS
    eta: float | None     # None when the scheduler takes no eta (LCM)
    sources: dict         # model, lora, unet, controlnet, dtype, hsd_version: recorded in every image's metadata

    @property
    def native_size(self) -> int:
        """The pipeline's default side (FLUX's transformer states none: its pipeline's 128 latents, 1024 px)."""
        latent = getattr(self.pipe, "default_sample_size", None) or pipe_denoiser(self.pipe).config.sample_size
        return latent * self.pipe.vae_scale_factor

    def _schedule(self, steps: int) -> dict:
        """The pipeline's scheduling arguments: trailing sigmas (flow), or one-step timesteps and eta (VP)."""
        if hasattr(self.pipe, "transformer"):
            from ..diffusion.schedule import trailing_sigmas
            return {} if self.scheduler == "default" else {"sigmas": trailing_sigmas(steps)}
        timesteps = ONE_STEP_TIMESTEPS.get(self.scheduler) if steps == 1 else None
        return {"timesteps": timesteps, "eta": self.eta or 0.0}

    def generate(self, prompts: list[str], steps: int, seeds: list[int], guidance: float = 0.0,
                 height: int | None = None, width: int | None = None, batch_size: int = 4,
                 negative_prompt: str | None = None, control_image: str | Path | Image.Image | None = None,
                 control_scale: float = 1.0) -> list[Image.Image]:
        """One image per (prompt, seed); each carries its settings in `image.info["hsd"]` for `save_png`.

        `negative_prompt` (one for all images) acts only at guidance > 1. `control_image` (a file or a PIL image)
        is required by, and only taken by, a generator loaded with a ControlNet."""
        if len(prompts) != len(seeds):
            raise GenerateError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per image")
        size = (height or self.native_size, width or self.native_size)
        control, meta = self._control(control_image, control_scale, size)
        meta["negative_prompt"] = negative_prompt
        return [image for i in range(0, len(prompts), batch_size)
                for image in self._batch(prompts[i:i + batch_size], seeds[i:i + batch_size], steps, guidance, size,
                                         negative_prompt, control, meta)]

    def _control(self, image, scale, size) -> tuple[dict, dict]:
        """The ControlNet's pipeline arguments and their metadata; both empty-valued without a ControlNet."""
        if image is None and self.sources.get("controlnet"):
            raise GenerateError(f"the ControlNet {self.sources['controlnet']} needs a control image "
                                f"(control_image=, --control-image FILE), {IMAGE_FILE}")
        if image is None:
            return {}, dict(control_image=None, control_scale=None)
        if not self.sources.get("controlnet"):
            raise GenerateError("a control image needs a ControlNet: load the generator with controlnet=DIR "
                                f"(--controlnet DIR), {CONTROLNET_FOLDER}")
        image = read_control_image(image) if isinstance(image, (str, Path)) else image
        path = image.info.get("path") or getattr(image, "filename", None) or None
        # Resized here rather than by diffusers' processor: the ControlNet sees exactly the output size, whatever
        # the file's size (stretched if its aspect differs), and the metadata describes what it saw.
        image = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.LANCZOS)
        return (dict(image=image, controlnet_conditioning_scale=float(scale)),
                dict(control_image=path, control_scale=float(scale)))

    def _batch(self, prompts, seeds, steps, guidance, size, negative_prompt, control, meta) -> list[Image.Image]:
        import torch
        # One CPU generator per image: its noise depends on its seed alone, not on its batch or the device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        # A list, one per prompt: diffusers refuses a str negative prompt beside a list of prompts.
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        images = self.pipe(prompt=list(prompts), negative_prompt=negative, num_inference_steps=steps,
                           guidance_scale=guidance, generator=generators, height=size[0], width=size[1],
                           **self._schedule(steps), **control).images
        shared = dict(steps=steps, guidance=guidance, height=size[0], width=size[1], **self.sources, **meta,
                      scheduler=self.scheduler, eta=self.eta, timesteps=self.pipe.scheduler.timesteps.tolist())
        for image, prompt, seed in zip(images, prompts, seeds):
            image.info["hsd"] = dict(prompt=prompt, seed=seed, **shared)
        return images


def load_generator(model: str | Path, lora: list[tuple[str | Path, float]] = (), unet: str | Path | None = None,
                   scheduler: str = "ddim", eta: float | None = None, dtype: str = "float32",
                   device: str = "cpu", controlnet: str | Path | None = None, t5: bool = False) -> ImageGenerator:
    """A model folder, optional LoRAs fused at their weights, an optional replacement UNet, an optional
    ControlNet folder (its generator then needs a control image), and a recipe. `t5`: SD3 with its T5 encoder (for
    a LoRA trained with model.t5)."""
    import torch

    from ..models.components import load_components, pipeline
    from ..models.dit import dit_family, dit_pipeline, is_dit_folder, load_dit
    if scheduler not in SCHEDULERS or dtype not in DTYPES:
        raise GenerateError(f"scheduler must be one of {SCHEDULERS} and dtype one of {DTYPES}, "
                            f"not {scheduler!r} and {dtype!r}")
    dit = is_dit_folder(Path(model))
    if t5 and not (dit and dit_family(model) == "sd3"):
        raise GenerateError(f"--t5 adds SD3's optional T5 encoder; {model} is not an SD3 folder (FLUX always reads "
                            f"its T5)")
    if dit:
        if scheduler not in FLOW_SCHEDULERS or unet or controlnet:
            raise GenerateError(f"{model} is a flow-matching model (SD3 or FLUX): --scheduler one of "
                                f"{', '.join(FLOW_SCHEDULERS)}, and no --unet or --controlnet")
        components = load_dit(model, t5=t5)
        pipe = dit_pipeline(components)
    else:
        if scheduler == "euler":
            raise GenerateError(f"--scheduler euler is for flow-matching models (SD3, FLUX); {model} is a UNet model")
        components = load_components(model)  # without transformers' per-encoder bars: ours is one bar over images
        if unet:
            components.unet = _load_unet(Path(unet), components)
        pipe = pipeline(components)
    for i, (path, weight) in enumerate(lora):
        _fuse_lora(pipe, Path(path), weight, f"lora{i}", components.family)
    if controlnet:
        from .controlnet import controlnet_pipeline, load_controlnet
        pipe = controlnet_pipeline(pipe, load_controlnet(Path(controlnet), pipe, components.family))
    pipe.to(device)
    # Fused in float32, then cast: half precision rounds the merged weights once. Skipped for float32, the
    # loaded dtype, since any dtype cast makes diffusers 0.42 log a spurious "keep in float32" warning.
    if dtype != "float32":
        pipe.to(dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)       # callers show one bar over images, not one per batch
    if scheduler != "default" and not hasattr(pipe, "transformer"):  # flow: the model's Euler, given sigmas
        pipe.scheduler = recipe_scheduler(scheduler, pipe.scheduler.config)
    takes_eta = "eta" in inspect.signature(pipe.scheduler.step).parameters
    eta = (DEFAULT_ETA.get(scheduler, 0.0) if eta is None else eta) if takes_eta else None
    sources = dict(model=str(model), lora=[dict(path=str(p), weight=float(w)) for p, w in lora],
                   unet=str(unet) if unet else None, controlnet=str(controlnet) if controlnet else None,
                   dtype=dtype, t5=t5, hsd_version=version("hsd"))
    return ImageGenerator(pipe, scheduler, eta, sources)


def _load_unet(path: Path, components):
    """A diffusers UNet folder, or a bare state dict over the model's UNet config (how Hyper-SD ships its
    one-step UNet)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from ..models.components import ModelError, family_of
    if not path.exists():
        raise ModelError(f"UNet not found: {path} (expected a diffusers UNet folder with config.json, "
                         f"or a .safetensors state dict of the model's UNet)")
    if path.is_dir():
        unet = UNet2DConditionModel.from_pretrained(path, local_files_only=True)
    else:
        unet = UNet2DConditionModel.from_config(components.unet.config)
        unet.load_state_dict(load_file(path))
    if family_of(unet.config) != components.family:
        raise ModelError(f"UNet {path} is {family_of(unet.config).upper()} but the model is "
                         f"{components.family.upper()}")
    return unet.eval()


def _fuse_lora(pipe, path: Path, weight: float, name: str, family: str) -> None:
    from ..models.components import ModelError
    if not path.is_file():
        raise ModelError(f"LoRA file not found: {path}")
    _check_lora_fits(pipe_denoiser(pipe), path, family)
    try:
        pipe.load_lora_weights(str(path), adapter_name=name)
    except Exception as e:  # foreign layouts fail deep inside diffusers (ValueError, KeyError, IndexError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # peft lists every mismatch on its own line
        raise ModelError(f"diffusers cannot load the LoRA {path} into this model ({type(e).__name__}: {first}); "
                         f"expected {LORA_LAYOUTS}") from e
    if not any(name in names for names in pipe.get_list_adapters().values()):
        raise ModelError(f"LoRA {path} matched no module of this model; expected {LORA_LAYOUTS}")
    pipe.fuse_lora(lora_scale=weight, adapter_names=[name])
    pipe.unload_lora_weights()                       # drops the peft layers; the fused weights stay


def _check_lora_fits(unet, path: Path, family: str) -> None:
    """Refuse a LoRA trained for another UNet architecture before diffusers loads it (peft would list every
    size mismatch, then blame the key layout). A file hsd's reader does not take (text-encoder modules, other
    layouts) is left to diffusers, whose error names the layouts it expects."""
    import torch

    from ..models.components import ModelError
    from ..models.lora_formats import LoraFormatError, read_lora
    try:
        lora = read_lora(path, unet.config)
    except LoraFormatError:
        return
    from ..models.denoisers import denoiser_name
    from ..models.lora import prefix_mismatch
    if (why := prefix_mismatch(lora, unet)) is not None:
        raise ModelError(f"{why}: {OTHER_ARCH}")
    layers, missing = dict(unet.named_modules()), []
    model = f"this {FAMILY_NAMES.get(family, family)} model's {denoiser_name(unet)}"
    for name, m in lora.modules.items():
        layer = layers.get(name)
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            missing.append(name)
            continue
        shape, needs = (m.up.shape[0], *m.down.shape[1:]), tuple(layer.weight.shape)  # a 1x1 conv may be a matrix
        if shape[0] != needs[0] or math.prod(shape) != math.prod(needs):
            raise ModelError(f"{path}: module {name} has shape {shape} but {model} needs {needs}: {OTHER_ARCH}")
    if missing:
        raise ModelError(f"{path}: {len(missing)} of its {len(lora.modules)} modules are not in {model} "
                         f"(e.g. {missing[0]}): {OTHER_ARCH}")


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write atomically, with each setting in its own text chunk and all of them as JSON in "hsd"."""
    meta = image.info.get("hsd", {})
    info = PngInfo()
    for key, value in meta.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("hsd", json.dumps(meta))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_control_image(path: str | Path) -> Image.Image:
    """RGB whatever the file's mode (edge maps are often grayscale, pose images RGBA); its path kept in
    `info["path"]` for the metadata."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"control image not found: {path}; expected {IMAGE_FILE}")
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")            # decodes the pixels: a truncated file fails here, not later
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise GenerateError(f"cannot read the control image {path} ({type(e).__name__}: {e}); "
                            f"expected {IMAGE_FILE}") from e
    image.info["path"] = str(path)
    return image


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-blank line (UTF-8 text)."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise GenerateError(f"prompt file {what}: {path} (expected a UTF-8 text file, one prompt per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GenerateError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start}); expected one "
                            f"prompt per line") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise GenerateError(f"prompt file {path} holds no prompts (one per line expected)")
    return prompts


def run_generate(args) -> list[Path]:
    """Every prompt x seed, once per step count; PNGs named by prompt index, seed and steps."""
    from tqdm import tqdm
    check_output(args.out, "--out (the image folder)")
    family = model_family(Path(args.model))
    apply_preset(args, family)
    prompts = read_prompts(args.prompts) if args.prompts else args.prompt
    control_image = _control_args(args)      # before the models load: a bad image fails in a blink
    if args.negative_prompt is not None and family == "flux":
        raise GenerateError("--negative-prompt: FLUX.1-dev is guidance-distilled (no CFG, so no negative prompt); "
                            "--guidance is the value its guidance embedding takes")
    if args.negative_prompt is not None and args.guidance <= 1:
        print(f"note: --negative-prompt acts only with --guidance > 1, not {args.guidance}", file=sys.stderr)
    gen = load_generator(args.model, args.lora, args.unet, args.scheduler, args.eta, args.dtype, args.device,
                         args.controlnet, args.t5)
    scale = 1.0 if args.control_scale is None else args.control_scale
    jobs = [(i, prompt, args.seed + j) for i, prompt in enumerate(prompts) for j in range(args.n_per_prompt)]
    written = []
    with tqdm(total=len(jobs) * len(args.steps), unit="img", desc="generate") as bar:
        for steps in args.steps:
            for k in range(0, len(jobs), args.batch_size):
                chunk = jobs[k:k + args.batch_size]
                images = gen.generate([p for _, p, _ in chunk], steps, [s for _, _, s in chunk], args.guidance,
                                      args.height, args.width, args.batch_size, args.negative_prompt,
                                      control_image, scale)
                for (i, _, seed), image in zip(chunk, images):
                    written.append(save_png(image, args.out / f"p{i:04d}_seed{seed}_steps{steps}.png"))
                bar.update(len(chunk))
    return written


def _control_args(args) -> Image.Image | None:
    """--controlnet and --control-image come together (--control-scale only with them); the image, read."""
    if args.control_image and not args.controlnet:
        raise GenerateError(f"--control-image needs --controlnet DIR: {CONTROLNET_FOLDER}")
    if args.controlnet and not args.control_image:
        raise GenerateError(f"--controlnet needs --control-image FILE: the edge map, depth map or pose image that "
                            f"guides the layout, as {IMAGE_FILE}")
    if args.control_scale is not None and not args.controlnet:
        raise GenerateError("--control-scale needs --controlnet DIR and --control-image FILE")
    return read_control_image(args.control_image) if args.control_image else None


def cmd_generate(args) -> None:
    """A ModelError or GenerateError reaches the CLI's one handler (hsd.errors.run_guarded): one line, status 2."""
    written = run_generate(args)
    print(f"wrote {len(written)} images to {args.out}")


def parse_lora(spec: str, default: float | None = 1.0) -> tuple[str, float | None]:
    """FILE[:WEIGHT]; a ':' not followed by a number belongs to the path; no weight: `default`."""
    path, sep, weight = spec.rpartition(":")
    try:
        return (path, float(weight)) if sep else (spec, default)
    except ValueError:
        return spec, default


def lora_or_preset(spec: str) -> tuple[str, float | None]:
    """`hsd generate --lora`: no weight is None, filled from --preset (or 1) by `apply_preset`."""
    return parse_lora(spec, None)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return int(text)


def add_generate_command(subparsers) -> argparse.ArgumentParser:
    g = subparsers.add_parser("generate", help="images with the Hyper-SD recipes; PNGs carry their settings")
    g.add_argument("--model", required=True, help="diffusers pipeline folder (SD1.5, SDXL, SD3 or FLUX.1)")
    g.add_argument("--lora", type=lora_or_preset, nargs="+", action="extend", default=[], metavar="FILE[:WEIGHT]",
                   help="LoRA safetensors (diffusers or kohya layout), fused at WEIGHT (default 1, or the preset's)")
    g.add_argument("--unet", help="UNet folder or .safetensors replacing the model's (the one-step UNet)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="ddim",
                   help="ddim: N-step LoRAs; tcd: unified LoRA; lcm: one-step UNet (t=800); euler: flow-matching "
                        "models (SD3; ddim means the same there); default: the model's")
    g.add_argument("--eta", type=float, help="TCD/DDIM eta (default: 1.0 for tcd, 0 for ddim)")
    g.add_argument("--steps", type=positive_int, nargs="+", help="one image set per step count (required unless "
                                                                     "--preset gives them)")
    g.add_argument("--preset", choices=list(PRESETS), help="a release recipe: its steps and guidance (unless given) "
                                                           "and its LoRA scale for a --lora without :WEIGHT")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT")
    src.add_argument("--prompts", type=Path, metavar="FILE", help="text file, one prompt per line")
    g.add_argument("--seed", type=int, default=0, help="image j of every prompt uses seed + j")
    g.add_argument("--n-per-prompt", type=positive_int, default=1)
    g.add_argument("--batch-size", type=positive_int, default=4)
    g.add_argument("--guidance", type=float, help="CFG scale; <= 1 disables CFG, as the recipes do (default 0, or the "
                                                  "preset's); on FLUX.1 the value its guidance embedding takes "
                                                  "(default 3.5)")
    g.add_argument("--negative-prompt", metavar="TEXT",
                   help="one negative prompt for all images; acts only with --guidance > 1 (the CFG-preserving "
                        "LoRAs' use, at guidance 5-8)")
    g.add_argument("--t5", action="store_true", help="SD3: also load the folder's T5 encoder (text_encoder_3), as "
                                                     "for a LoRA trained with model.t5=true (default: without T5)")
    g.add_argument("--controlnet", metavar="DIR", help="ControlNet: a diffusers ControlNetModel folder of the "
                                                      "model's family (SD1.5 or SDXL); needs --control-image")
    g.add_argument("--control-image", type=Path, metavar="FILE",
                   help="the ControlNet's image (edge map, depth, pose...), resized to the output size")
    g.add_argument("--control-scale", type=float, metavar="SCALE",
                   help="weight of the ControlNet's residuals (default 1; 0 leaves the model alone)")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--height", type=int, help="default: the model's native size")
    g.add_argument("--width", type=int, help="default: the model's native size")
    g.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    g.set_defaults(fn=cmd_generate)
    return g
