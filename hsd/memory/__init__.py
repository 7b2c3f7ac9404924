"""Per-rank GPU memory of a configured recipe: the arithmetic and the table (no torch here).

A stage's `Footprint` holds what it keeps on the device, counted on the real architecture built on the meta device
(hsd.memory.build), and the timeline of live bytes while its training_step runs under FakeTensorMode
(hsd.memory.trace). `per_rank` turns it into per-rank terms for a strategy and a number of ranks:

- ddp / auto: every tensor on every rank; with more than one rank DDP's gradient buckets, one more copy of every
  tensor that requires grad when the module is wrapped (gradient_as_bucket_view is off in Lightning's default).
- fsdp: the frozen UNet (FSDP, down/mid/up blocks wrapped) and the full trained copies of DMD (generator/fake =
  full: their fp32 weights, gradients and AdamW moments) are divided by N; LoRA tensors, their gradients and
  moments, the discriminator, text encoders, VAE and scorers stay whole. Gathered while a UNet runs: its root
  unit and two blocks at once (the running one and the prefetched one) in the compute dtype (bf16 or fp16 under
  mixed precision), plus one block's unsharded gradient for a trained copy. Autocast's bf16 copies of weights are
  not made (FSDP gathers them in bf16).
The timeline gives the largest gradients and the largest activations (with temporaries: autocast copies, the
optimizer's foreach buffers at its step) alive at any moment, and the total: the persistent terms plus the peak of
activations and gradients together. They peak at different moments (activations before backward, gradients after
it), so the total can be less than the sum of the rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 2 ** 30
ROWS = ("frozen weights", "trained weights", "gradients (largest alive)", "optimizer state (+ EMA)",
        "DDP buckets / FSDP gathers", "activations (largest alive)", "total (peak of the step)")
TOTAL = ROWS[-1]
SLACK, RESERVE_GIB = 0.10, 1.5  # "fits": total * (1 + SLACK) + RESERVE_GIB <= the GPU's memory
ALWAYS_UNCOUNTED = "CUDA context, NCCL and cuBLAS workspaces and allocator fragmentation (the fit rule's margin)"


@dataclass
class Footprint:
    """What one stage holds on one rank before sharding, in bytes. events: the step's timeline, each moment as
    (activations and temporaries, gradients kept whole, gradients FSDP shards, autocast copies of sharded weights,
    temporaries FSDP shards: the optimizer's foreach buffers of the full copies)."""
    name: str
    batch: int
    frozen: float = 0.0            # replicated: text encoders, VAE, scorers, adapters not trained in the stage
    frozen_sharded: float = 0.0    # the frozen UNet's own weights (FSDP shards them)
    trained: float = 0.0           # LoRA tensors, the discriminator
    trained_sharded: float = 0.0   # DMD's full copies (FSDP2 shards them)
    optimizer: float = 0.0         # moments of `trained`, the EMA
    optimizer_sharded: float = 0.0
    ddp_buckets: float = 0.0       # bytes of the tensors that require grad when DDP wraps the module
    gathered: float = 0.0          # the most FSDP holds unsharded at one time (see the module docstring)
    events: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)  # what ran at each event (a module, backward, optimizer step)
    parts: dict[str, float] = field(default_factory=dict)  # named frozen parts, for the notes
    not_counted: list[str] = field(default_factory=list)
    # what `settle` needs to hold the same stage another way, counted as built (model.quantize and data.cache off):
    linear: float = 0.0            # the frozen denoiser's Linear weights (in frozen_sharded)...
    quantized: dict[str, float] = field(default_factory=dict)  # ...and their bytes under each model.quantize mode
    largest_linear: float = 0.0    # the largest of them, dense in the compute dtype (a quantized layer's working copy)
    # the frozen parts (in frozen) a cached run of this stage does not load: the text encoders and the VAE, but for
    # the VAE a reward decodes with and the text encoders the instance term conditions COCO images on
    uncached: dict[str, float] = field(default_factory=dict)


ENCODING = ("text encoders", "VAE encoder")  # the step's phases a cached run (data.cache) does not have


def settle(f: Footprint, quantize: str = "none", cached: bool = False) -> Footprint:
    """The stage held another way: the frozen denoiser's Linear weights quantized (model.quantize: torchao's bytes,
    hsd.models.quantize.quantized_bytes, plus the working copy of one dequantized layer while it runs), and/or the
    conditioning read from a cache (data.cache: no text encoders, no VAE unless the stage decodes, no encoding
    moments in the step). The activations are the traced ones: quantization does not change them."""
    out = replace(f, events=list(f.events), phases=list(f.phases), parts=dict(f.parts))
    if quantize != "none":
        out.frozen_sharded += f.quantized[quantize] - f.linear
        out.frozen += f.largest_linear
        out.parts[f"denoiser Linear weights ({quantize})"] = f.quantized[quantize]
    if cached:
        out.frozen -= sum(f.uncached.values())
        for key in f.uncached:
            out.parts.pop(key, None)
        keep = [i for i, phase in enumerate(f.phases) if phase not in ENCODING] if f.phases else []
        if keep:
            out.events, out.phases = [f.events[i] for i in keep], [f.phases[i] for i in keep]
    return out


def effective_strategy(strategy: str, gpus: int) -> str:
    """Lightning's choice: auto with more than one device is DDP; one device holds everything."""
    if strategy == "fsdp":
        return "fsdp"
    return "ddp" if gpus > 1 else "single device"


def per_rank(f: Footprint, strategy: str, gpus: int) -> dict[str, float]:
    """The ROWS in bytes for one rank of `gpus` under `strategy` (auto | ddp | fsdp), and "peak during"."""
    kind = effective_strategy(strategy, gpus)
    n = gpus if kind == "fsdp" else 1
    cast = 0.0 if kind == "fsdp" else 1.0
    events = f.events or [(0.0, 0.0, 0.0, 0.0, 0.0)]
    act = [e[0] + e[3] * cast + e[4] / n for e in events]
    grads = [e[1] + e[2] / n for e in events]
    peak = max(range(len(events)), key=lambda i: act[i] + grads[i])
    rows = {
        ROWS[0]: f.frozen + f.frozen_sharded / n,
        ROWS[1]: f.trained + f.trained_sharded / n,
        ROWS[2]: max(grads),
        ROWS[3]: f.optimizer + f.optimizer_sharded / n,
        ROWS[4]: f.ddp_buckets if kind == "ddp" else f.gathered if kind == "fsdp" else 0.0,
        ROWS[5]: max(act),
    }
    rows[TOTAL] = rows[ROWS[0]] + rows[ROWS[1]] + rows[ROWS[3]] + rows[ROWS[4]] + act[peak] + grads[peak]
    rows["peak during"] = f.phases[peak] if f.phases else ""
    return rows


def state(rows: dict[str, float]) -> float:
    """Everything but activations: weights, the largest gradients, optimizer state (+ EMA) and DDP's gradient
    buckets (a flat copy of the gradients) or FSDP's gathered blocks."""
    return sum(rows[k] for k in ROWS[:5])


def fits(total: float, gpu_gib: float) -> bool:
    return total / GIB * (1 + SLACK) + RESERVE_GIB <= gpu_gib


def table(footprints: list[Footprint], strategy: str, gpus: int, gpu_gib: float) -> str:
    """A markdown table, one column per stage, GiB per rank, the fit against `gpu_gib` and the peak stage."""
    kind = effective_strategy(strategy, gpus)
    cols = [per_rank(f, strategy, gpus) for f in footprints]
    head = [f"{f.name} (micro-batch {f.batch})" for f in footprints]
    lines = [f"| GiB per rank: {kind}, {gpus} GPU{'s' if gpus > 1 else ''} | " + " | ".join(head) + " |",
             "|---|" + "---:|" * len(footprints)]
    for row in ROWS:
        cells = [f"{c[row] / GIB:.2f}" for c in cols]
        bold = "**" if row == TOTAL else ""
        lines.append(f"| {bold}{row}{bold} | " + " | ".join(f"{bold}{x}{bold}" for x in cells) + " |")
    lines.append("| peak during | " + " | ".join(c["peak during"] for c in cols) + " |")
    lines.append(f"| fits {gpu_gib:g} GiB | " + " | ".join("yes" if fits(c[TOTAL], gpu_gib) else "**NO**"
                                                         for c in cols) + " |")
    worst = max(range(len(cols)), key=lambda i: cols[i][TOTAL])
    lines.append("")
    lines.append(f"Peak over stages: {footprints[worst].name}, {cols[worst][TOTAL] / GIB:.2f} GiB per rank "
                 f"({'fits' if fits(cols[worst][TOTAL], gpu_gib) else 'does NOT fit'} {gpu_gib:g} GiB: "
                 f"total x {1 + SLACK:g} + {RESERVE_GIB:g} GiB must stay below it).")
    return "\n".join(lines)


def notes(footprints: list[Footprint]) -> str:
    """The frozen parts counted and everything not counted, once for all stages."""
    parts = {}
    for f in footprints:
        parts.update(f.parts)
    uncounted = list(dict.fromkeys([x for f in footprints for x in f.not_counted] + [ALWAYS_UNCOUNTED]))
    lines = ["Counted (GiB, unsharded): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items()) + "."]
    lines += [f"Not counted: {x}." for x in uncounted]
    return "\n".join(lines)
