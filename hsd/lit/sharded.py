"""Sharded full fine-tunes: the trained UNet copies of a stage (DMD's one-step generator and fake score) split over
the ranks with FSDP2, and the checkpoints that hold them.

Why FSDP2 (`fully_shard`) on the copies and not Lightning's `ModelParallelStrategy`: that strategy refuses a model
holding FSDP1 modules, and the frozen UNet keeps the FSDP1 wrapping that serves every LoRA recipe (its LoRA tensors
ignored, so the EMA and exports see whole tensors). `fully_shard` turns each copy's parameters into DTensors in
place (names unchanged), which plain AdamW, `clip_grad_norm_` and `torch.distributed.checkpoint` all take as they
are, and its gradients are reduce-scattered (averaged) in backward: a step of a sharded copy is the DDP step.

A checkpoint with sharded tensors is a folder: `torch.distributed.checkpoint` files (every trained tensor and every
optimizer state, named, each rank writing its shards) and `meta.pt` (Lightning's loops and callbacks, rank 0),
written into a temp folder that replaces the old one only when complete (`hsd.io.atomic_dir`).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..io import atomic_dir
from ..models.denoisers import denoiser_blocks, denoiser_class
from .resume import META, check_resumable, unreadable_checkpoint


def is_sharded(t: Tensor) -> bool:
    return isinstance(t, DTensor)


def param_dtype(precision: str) -> torch.dtype | None:
    """The dtype a sharded copy is gathered and computed in under Lightning's `precision` (None: its own, fp32)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def shard_copy(unet: nn.Module, mesh, precision: str) -> None:
    """FSDP2 over a trained denoiser copy: each block a unit (`denoiser_blocks`), the rest under the root. Weights,
    gradients and AdamW states then live 1/N per rank (fp32); under bf16-mixed the gathered weights are bf16,
    gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype(precision), reduce_dtype=torch.float32)
    for block in denoiser_blocks(unet):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # The root too is resharded after every forward (FSDP2 keeps a root gathered until its backward by default):
    # DMD runs the copies without gradient between updates, and a gathered root would outlive the optimizer step.
    fully_shard(unet, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


# ---- checkpoints ----
def init_optimizer_states(optimizers) -> None:
    """Create each optimizer's per-tensor state (a step at lr 0 on zero gradients: the tensors do not change), so a
    sharded checkpoint can be loaded into it in place."""
    for opt in optimizers:
        if opt.state:
            continue
        lrs = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr


def flat_state(module, optimizers) -> dict[str, Tensor]:
    """Every trained tensor ("model.<name>") and every optimizer state tensor ("optim<i>.<name>.<key>") by name: what
    a sharded checkpoint holds, as the live tensors themselves (loading fills them in place)."""
    named = module.trained_tensors()
    out = {f"model.{n}": p.data for n, p in named.items()}
    names = {id(p): n for n, p in named.items()}
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    out[f"optim{i}.{names[id(p)]}.{key}"] = value
    return out


def save_sharded(strategy, checkpoint: dict, module, path: str | Path) -> None:
    """Write the checkpoint as a folder at `path` (collective): a crash leaves the previous one whole."""
    import torch.distributed.checkpoint as dcp
    meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    meta["optimizer_states"] = [{"param_groups": o["param_groups"]} for o in checkpoint.get("optimizer_states", [])]
    with atomic_dir(path) if strategy.is_global_zero else nullcontext() as tmp:
        tmp = strategy.broadcast(str(tmp) if tmp is not None else None)
        dcp.save(flat_state(module, strategy.optimizers), checkpoint_id=tmp)
        if strategy.is_global_zero:
            torch.save(meta | {"sharded": True}, Path(tmp) / META)
        strategy.barrier("sharded checkpoint written")
    strategy.barrier("sharded checkpoint in place")


def load_sharded(strategy, module, path: str | Path, weights_only=None) -> dict:
    """Fill the trained tensors and optimizer states from a folder checkpoint in place; Lightning's part returned.
    Lightning's part is read first: a folder without it (or not a checkpoint at all) is named before any tensor."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    check_resumable(path)
    meta = strategy.checkpoint_io.load_checkpoint(Path(path) / META, weights_only=weights_only)
    init_optimizer_states(strategy.optimizers)
    try:
        dcp.load(flat_state(module, strategy.optimizers), checkpoint_id=str(path))
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError) as e:  # DCP's, for torn or foreign shards
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        first = (str(cause).strip().splitlines() or ["cut short"])[0]  # a rank's own error, not DCP's list of ranks
        raise unreadable_checkpoint(path, f"its shards do not load: {type(cause).__name__}: {first[:200]}") from e
    return meta


def gathered_state(unet: nn.Module) -> dict[str, Tensor] | None:
    """A (possibly sharded) UNet's whole state dict on the CPU of rank 0 (collective when sharded); None elsewhere."""
    import torch.distributed as dist
    if not any(is_sharded(p) for p in unet.parameters()):
        return unet.state_dict() if not dist.is_initialized() or dist.get_rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def save_unet(unet: nn.Module, path: Path) -> None:
    """A trained UNet copy as a diffusers folder (written atomically by rank 0; every rank must call it)."""
    state = gathered_state(unet)
    if state is None:
        return
    with torch.device("meta"):
        plain = denoiser_class(unet).from_config(unet.config)
    plain.load_state_dict(state, assign=True)
    with atomic_dir(path) as tmp:
        plain.save_pretrained(tmp)
