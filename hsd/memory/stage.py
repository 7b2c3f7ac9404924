"""Each stage's `hsd.memory.Footprint`: its LightningModule built on the plan's parts, what it holds counted tensor by
tensor, and its training_step traced under FakeTensorMode (hsd.memory.trace) for the activations."""
from __future__ import annotations

import math
import re

import torch

from ..config import Run
from ..models.denoisers import denoiser_blocks, denoiser_name
from . import Footprint
from .build import (
    HALF_MIXED,
    TRUE_DTYPES,
    Parts,
    StageSpec,
    adapters_at,
    build_module,
    build_parts,
    modules_of,
    optimizer_groups,
    plan,
)
from .trace import LiveBytes, Replay, fake_mode, fakeify, trace_step


def load_run(paths: list[str], overrides: list[str]) -> Run:
    """The config as hsd.config loads it, every rule checked but the world's files (model.path, data, scorer
    and COCO paths): the memory model reads none of them."""
    from ..config import load_config
    from ..errors import ConfigError
    run = load_config(paths, overrides, inputs=False)
    if run.world not in ("sd15", "sdxl", "sd3", "flux"):
        raise ConfigError(f"hsd memory models the sd15, sdxl, sd3 and flux worlds, got world {run.world!r} (the lab "
                          f"world trains on a CPU in minutes)")
    return run


_ADAPTER = re.compile(r"\.lora_[AB]\.([^.]+)\.")
_CAPTION = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def footprints(cfg: Run, arch: str | None = None, device: str = "cuda", fsdp: bool | None = None,
               activations: bool = True, log=None) -> list[Footprint]:
    """One Footprint per stage of the plan. arch: a registered architecture (default: the world's); device: whose
    AdamW temporaries to count (cuda: foreach, one copy of the trained tensors; cpu: per tensor); fsdp: build the
    modules as under FSDP (default: trainer.strategy); activations: trace each step (else only the gradients)."""
    return sweep(cfg, [None], arch, device, fsdp, activations, log)[None]


def sweep(cfg: Run, sizes: list[int | None], arch: str | None = None, device: str = "cuda", fsdp: bool | None = None,
          activations: bool = True, log=None) -> dict[int | None, list[Footprint]]:
    """`footprints` for each micro-batch size per rank (None: the config's), the parts built once."""
    fsdp = cfg.trainer.strategy == "fsdp" if fsdp is None else fsdp
    parts = build_parts(cfg, arch or cfg.world)
    mode = fake_mode()
    fakeify(mode, *modules_of(parts))
    Replay(*(u for u in (parts.unet, parts.gen, parts.fake) if u is not None))
    traces: dict[tuple, LiveBytes] = {}
    out = {}
    for size in sizes:
        out[size] = []
        for spec in plan(cfg):
            spec = spec if size is None else StageSpec(spec.kind, spec.name, spec.index, size)
            with parts.adapters.restoring():
                with mode, LiveBytes():
                    module = build_module(parts, spec, fsdp)
                f = count(module, parts, spec, fsdp, device)
                if not activations:
                    f.events, f.phases = _gradient_events(module), []
                    out[size].append(f)
                    continue
                key = _trace_key(cfg, spec, fsdp)
                if key not in traces:
                    if log:
                        log(f"tracing {spec.name} (micro-batch {spec.batch}) under FakeTensorMode...")
                    traces[key] = trace(module, parts, spec, mode, device)
                f.events, f.phases = traces[key].events, traces[key].phases
            out[size].append(f)
    return out


def _gradient_events(module) -> list[tuple]:
    """Without a trace: each optimizer's gradients alive alone (the stages free them after every step; with
    gradient accumulation the trained tensors' gradients are alive all along, which is one optimizer's too)."""
    shard = _sharded_ids(module)
    return [(0, sum(nbytes(p) for p in g if id(p) not in shard), sum(nbytes(p) for p in g if id(p) in shard), 0, 0)
            for g in optimizer_groups(module)]


def _trace_key(cfg: Run, spec: StageSpec, fsdp: bool) -> tuple:
    """Stages whose steps hold the same memory: every TSCD stage alike but for its discriminator (and a previous-
    stage teacher); under FSDP the discriminator's features run the whole UNet (matters without up_features)."""
    if spec.kind != "tscd":
        return spec.kind, spec.batch
    s, t = cfg.tscd.stages[spec.index], cfg.tscd
    adv = s.w_adv > 0
    return ("tscd", spec.batch, adv, t.teacher == "previous" and spec.index > 0,
            fsdp and adv and not t.adv.up_features)


def example_batch(cfg: Run, batch: int) -> dict:
    """Raw image-text batch as hsd.data makes it (pixels in [-1, 1], captions)."""
    r = cfg.model.resolution
    return {"pixels": torch.zeros(batch, 3, r, r), "captions": [_CAPTION] * batch, "index": 0}


def trace(module, parts: Parts, spec: StageSpec, mode, device: str) -> LiveBytes:
    groups, shard = optimizer_groups(module), _sharded_ids(module)
    temps = [_foreach_temp(parts.cfg, spec, g, shard, device) for g in groups]
    cast = list(_fsdp_weights(module))
    with mode, LiveBytes():
        batch = example_batch(parts.cfg, spec.batch)
    return trace_step(module, batch, [(g, shard, *t) for g, t in zip(groups, temps)], parts.cfg.trainer.precision,
                      module.accumulate, mode, cast, labels(module), device)


def labels(module) -> dict[str, torch.nn.Module]:
    """The modules whose calls name a moment of the step."""
    out = {denoiser_name(module.unet): module.unet, "VAE encoder": module.encoder.vae.encoder,
           "VAE decoder": module.encoder.vae.decoder, "text encoders": module.encoder.text}
    for key, name in (("gen_unet", "DMD generator"), ("fake_unet", "DMD fake score"), ("disc", "discriminator")):
        if getattr(module, key, None) is not None:
            out[name] = getattr(module, key)
    loss = getattr(module, "loss", None) or getattr(module, "feedback", None)
    rewards = getattr(loss, "rewards", None)
    for name, scorer in (rewards.scorers.items() if rewards is not None else ()):
        out[f"{name} scorer"] = scorer
    return out


def _sharded_ids(module) -> set[int]:
    """Trained tensors FSDP shards: the full DMD copies'."""
    return {id(p) for m in (getattr(module, "gen_unet", None), getattr(module, "fake_unet", None)) if m is not None
            for p in m.parameters()}


def _fsdp_weights(module):
    """The weights FSDP manages: the UNet's own (not its LoRA) and the full copies'."""
    yield from (p for n, p in module.unet.named_parameters() if "lora_" not in n)
    for m in (getattr(module, "gen_unet", None), getattr(module, "fake_unet", None)):
        if m is not None:
            yield from m.parameters()


def _eight_bit(cfg: Run, spec: StageSpec) -> bool:
    return spec.kind == "tscd" and cfg.tscd.optimizer == "adamw8bit"


def _moments(p: torch.Tensor, eight_bit: bool) -> int:
    """AdamW's two moments in the tensor's dtype; bitsandbytes' 8-bit AdamW: one byte each plus a float32 absmax
    per 256 values (tensors under 4096 values keep 32-bit moments)."""
    if eight_bit and p.numel() >= 4096:
        return 2 * p.numel() + 2 * 4 * math.ceil(p.numel() / 256)
    return 2 * nbytes(p)


def _foreach_temp(cfg: Run, spec: StageSpec, params, sharded: set[int], device: str) -> tuple[int, int]:
    """Bytes AdamW allocates at its step: foreach on CUDA makes sqrt(v) of every tensor at once (whole, sharded);
    the per-tensor path (CPU) two temporaries of the largest; bitsandbytes' fused kernel none."""
    if _eight_bit(cfg, spec) or not params:
        return 0, 0
    if device != "cuda":
        return 2 * max(nbytes(p) for p in params), 0
    return (sum(nbytes(p) for p in params if id(p) not in sharded),
            sum(nbytes(p) for p in params if id(p) in sharded))


def compute_bytes(precision: str) -> int:
    """Bytes per weight FSDP gathers: Lightning's FSDP mixed precision gathers in bf16/fp16."""
    if precision in HALF_MIXED:
        return 2
    dtype = TRUE_DTYPES.get(precision, torch.float32)
    return torch.empty((), dtype=dtype).element_size()


def gathered(unet, per_weight: int, trained: bool) -> int:
    """FSDP's unsharded bytes while this UNet runs: the root unit, the running block and the prefetched one, and
    for a trained copy one block's gradient before its reduce-scatter (in the compute dtype, and in fp32 for the
    reduction: hsd.lit.sharded reduces in fp32)."""
    blocks = denoiser_blocks(unet)
    sizes = [sum(p.numel() for n, p in b.named_parameters() if "lora_" not in n) for b in blocks]
    root = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n) - sum(sizes)
    grad = per_weight + (4 if per_weight != 4 else 0) if trained else 0
    return (root + 2 * max(sizes)) * per_weight + max(sizes) * grad


def count(module, parts: Parts, spec: StageSpec, fsdp: bool, device: str) -> Footprint:
    """What the stage's module holds (Lightning moves the whole module to the device), by category."""
    cfg, present = parts.cfg, adapters_at(parts.cfg, spec)
    groups = optimizer_groups(module)
    trained = {id(p) for g in groups for p in g}
    shard = _sharded_ids(module)
    f = Footprint(spec.name, spec.batch)
    named: dict[str, float] = {}
    denoiser = denoiser_name(module.unet)
    for name, p in module.named_parameters():
        m = _ADAPTER.search(name)
        if m and m[1] not in present:
            continue  # attached by a later stage
        b = nbytes(p)
        if id(p) in trained:
            f.trained_sharded += b if id(p) in shard else 0
            f.trained += 0 if id(p) in shard else b
        elif name.startswith("unet.") and "lora_" not in name:
            f.frozen_sharded += b
        else:
            f.frozen += b
        key = _part(name, denoiser)
        named[key] = named.get(key, 0) + b
    for name, b in module.named_buffers():
        if name.startswith("ema."):
            f.optimizer += nbytes(b)
        else:
            f.frozen += nbytes(b)
    eight = _eight_bit(cfg, spec)
    for g in groups:
        f.optimizer += sum(_moments(p, eight) for p in g if id(p) not in shard)
        f.optimizer_sharded += sum(_moments(p, eight) for p in g if id(p) in shard)
    f.ddp_buckets = sum(nbytes(p) for p in module.parameters() if p.requires_grad)
    per = compute_bytes(cfg.trainer.precision)
    copies = [m for m in (getattr(module, "gen_unet", None), getattr(module, "fake_unet", None)) if m is not None]
    f.gathered = max([gathered(module.unet, per, False)] + [gathered(m, per, True) for m in copies])
    f.parts = {k: v for k, v in named.items() if v}
    f.not_counted = _not_counted(cfg, spec)
    _alternatives(f, module, cfg, spec, per)
    return f


def _alternatives(f: Footprint, module, cfg: Run, spec: StageSpec, per_weight: int) -> None:
    """What hsd.memory.settle needs: the frozen denoiser's Linear weights (dense and under each model.quantize
    mode) and the parts a cached run of this stage does not load."""
    from ..models.quantize import quantized_bytes
    from ..names import QUANTIZE_MODES
    weights = [m.weight for n, m in module.unet.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    f.linear = sum(nbytes(w) for w in weights)
    f.quantized = {q: sum(quantized_bytes(tuple(w.shape), w.element_size(), q) for w in weights)
                   for q in QUANTIZE_MODES}
    f.largest_linear = max((w.numel() for w in weights), default=0) * per_weight
    feedback = spec.kind == "feedback" or (spec.kind == "dmd" and cfg.dmd.w_feedback > 0)
    needs = {"VAE"} if feedback else set()  # VaeDecoder: the rewards and the instance term decode x'_0
    if feedback and cfg.feedback.instance_weight:
        needs.add("text encoders")  # the instance term encodes COCO captions
    f.uncached = {k: f.parts[k] for k in ("text encoders", "VAE") if k in f.parts and k not in needs}


def _part(name: str, denoiser: str = "UNet") -> str:
    if "lora_" in name:
        return "LoRA adapters"
    for prefix, label in (("unet.", denoiser), ("encoder.text.", "text encoders"), ("encoder.vae.", "VAE"),
                          ("disc.", "discriminator"), ("gen_unet.", "DMD generator copy"),
                          ("fake_unet.", "DMD fake-score copy")):
        if name.startswith(prefix):
            return label
    return "scorers" if ".scorers." in name else "other"


def _not_counted(cfg: Run, spec: StageSpec) -> list[str]:
    f = cfg.feedback
    uses_feedback = spec.kind == "feedback" or (spec.kind == "dmd" and cfg.dmd.w_feedback)
    out = []
    if uses_feedback and f.instance_weight:
        out.append("SOLO's weights and activations in the instance loss (mmdet; the instance term's UNet and VAE "
                   "decoder are counted, with a stand-in for SOLO's loss)")
    if cfg.model.lora_init:
        out.append("model.lora_init's own shape (the TSCD LoRA is counted at lora.rank on lora.targets)")
    return out



def header(cfg: Run, paths: list[str], gpus: int) -> str:
    from . import effective_strategy
    m, kind = cfg.model, effective_strategy(cfg.trainer.strategy, gpus)
    how = {"ddp": "every tensor on every rank, plus DDP's gradient buckets",
           "single device": "one rank holds everything",
           "fsdp": "the frozen denoiser and DMD's full copies (weights, gradients, AdamW moments) sharded 1/N; LoRA, "
                   "discriminator, text encoders, VAE and scorers whole on every rank"}[kind]
    return (f"hsd memory: {' '.join(paths)} (world {cfg.world}, {m.resolution} px, precision "
            f"{cfg.trainer.precision}, frozen weights {m.frozen_dtype}, VAE {m.vae_dtype}, gradient checkpointing "
            f"{'on' if m.gradient_checkpointing else 'off'}, LoRA rank {cfg.lora.rank}, model.quantize "
            f"{m.quantize}, data.cache {'set: no text encoders or VAE to train' if cfg.data.cache else 'off'})\n"
            f"Strategy assumed: {kind} (trainer.strategy={cfg.trainer.strategy}, {gpus} rank{'s' if gpus > 1 else ''})"
            f": {how}. GiB per rank.")


def memory_report(cfg: Run, paths: list[str], gpus: int, gpu_gib: float, sizes: list[int] | None = None,
                  activations: bool = True, log=None) -> str:
    """What `hsd memory` prints: the header, one table per micro-batch size, the notes, and where the peak does not
    fit one GPU, the cheapest one-GPU setting that does (`propose`)."""
    from . import TOTAL, fits, notes, per_rank, settle, table
    runs = sweep(cfg, list(sizes or [None]), activations=activations, log=log)
    held = {k: [settle(f, cfg.model.quantize, bool(cfg.data.cache)) for f in fps] for k, fps in runs.items()}
    blocks = [header(cfg, paths, gpus)] + [table(fps, cfg.trainer.strategy, gpus, gpu_gib) for fps in held.values()]
    last = list(held.values())[-1]
    extra = "" if activations else "\nActivations were not traced (--no-activations): the totals hold no activations."
    peak = max(per_rank(f, cfg.trainer.strategy, gpus)[TOTAL] for f in last)
    if activations and not fits(peak, gpu_gib):
        extra += "\n\n" + propose(cfg, gpu_gib, log)
    return "\n\n".join(blocks) + "\n\n" + notes(last) + extra


QUANTIZE_LADDER = ("none", "int8", "nf4")  # fp8 holds what int8 holds; int8's verdict is the milder (docs/memory.md)


def _one_gpu(cfg: Run, checkpointing: bool) -> Run:
    from dataclasses import replace as swap
    return swap(cfg, trainer=swap(cfg.trainer, strategy="auto", devices=1, num_nodes=1),
                model=swap(cfg.model, gradient_checkpointing=checkpointing, quantize="none"),
                data=swap(cfg.data, cache=""))


def _batch(cfg: Run) -> int:
    return max(s.batch for s in plan(cfg))


def propose(cfg: Run, gpu_gib: float, log=None) -> str:
    """The cheapest setting that fits one GPU of `gpu_gib`, searched over model.quantize (none, int8, nf4), data.cache,
    gradient checkpointing and the micro-batch (halved down to 1, gradient accumulation raised to keep the
    effective batch), on one device (a quantized base is for one process). Cheapest: least quantization first
    (it alone changes what the student learns from), then the largest micro-batch (throughput), then no added
    checkpointing (about a third more compute), then no cache (a cached run fixes each image's crop and flip)."""
    from . import GIB, SLACK, RESERVE_GIB, TOTAL, fits, per_rank, settle
    b = _batch(cfg)
    sizes = sorted({max(1, b >> i) for i in range(b.bit_length())}, reverse=True)
    found = []  # (cost, peak, settings)
    for checkpointing in dict.fromkeys([cfg.model.gradient_checkpointing, True]):
        one = _one_gpu(cfg, checkpointing)
        runs = sweep(one, sizes, log=log)
        for size, fps in runs.items():
            for q in QUANTIZE_LADDER:
                for cached in (False, True):
                    peak = max(per_rank(settle(f, q, cached), "auto", 1)[TOTAL] for f in fps)
                    cost = (QUANTIZE_LADDER.index(q), sizes.index(size), checkpointing != cfg.model.gradient_checkpointing,
                            cached)
                    found.append((cost, peak, q, cached, checkpointing, size))
    fitting = sorted(x for x in found if fits(x[1], gpu_gib))
    lines = [f"Cheapest one-GPU setting that fits {gpu_gib:g} GiB (total x {1 + SLACK:g} + {RESERVE_GIB:g} GiB), searched "
             f"over model.quantize, data.cache, gradient checkpointing and the micro-batch:"]
    if not fitting:
        best = min(found, key=lambda x: x[1])
        return "\n".join(lines + [f"none fits: the least is {best[1] / GIB:.2f} GiB ({_settings(cfg, *best[2:])}). "
                                  f"Use more GPUs with FSDP (model.quantize=none)."])
    _, peak, *how = fitting[0]
    lines.append(f"  {_settings(cfg, *how)}")
    lines.append(f"  peak {peak / GIB:.2f} GiB per step. Every candidate (peak GiB):")
    lines.append("")
    lines.append("| quantize | cache | checkpointing | " + " | ".join(f"micro-batch {s}" for s in sizes) + " |")
    lines.append("|---|---|---|" + "---:|" * len(sizes))
    rows = {}
    for cost, peak, q, cached, ck, size in found:
        rows.setdefault((q, cached, ck), {})[size] = peak
    for (q, cached, ck), by in rows.items():
        cells = [f"{by[s] / GIB:.1f}" + ("" if fits(by[s], gpu_gib) else " ✗") for s in sizes]
        lines.append(f"| {q} | {'yes' if cached else 'no'} | {'on' if ck else 'off'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _settings(cfg: Run, quantize: str, cached: bool, checkpointing: bool, size: int) -> str:
    """The overrides of one candidate, as `hsd train` takes them."""
    out = ["trainer.strategy=auto", "trainer.devices=1", f"model.quantize={quantize}"]
    if cached:
        out.append("data.cache=DIR (from `hsd cache CONFIG --out DIR`)")
    if checkpointing != cfg.model.gradient_checkpointing:
        out.append("model.gradient_checkpointing=true")
    b = _batch(cfg)
    if size != b:
        ranks = cfg.trainer.devices * cfg.trainer.num_nodes
        accumulate = -(-cfg.tscd.batch_size * cfg.tscd.accumulate * ranks // size)
        out += [f"tscd.batch_size={size}", f"tscd.accumulate={accumulate}",
                f"(the configured effective batch, {cfg.tscd.batch_size} x {cfg.tscd.accumulate} x {ranks} rank(s), kept)"]
        out += [f"{k}.batch_size={size}" for k in ("feedback", "dmd") if getattr(cfg, k).iterations]
    return " ".join(out)
