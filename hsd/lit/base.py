"""What every training stage shares: a UNet with named peft adapters (adapters off = the frozen teacher), of
which the stage declares the ones it runs (`active`) and trains (`trained`); seeded per-batch randomness; optimizer
steps (with FSDP's gradient averaging of unsharded tensors); and checkpoints that hold only the trained tensors
(trained full networks, `trained_copies`, are sharded under FSDP).
TSCD, feedback and DMD subclass it and keep to their algorithm.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from ..data.batch import COUNTS, Batch, RawBatch, micro_batch
from ..diffusion.schedule import NoiseSchedule
from ..errors import MissingPackageError
from ..models.adapters import TSCD, Adapters
from ..models.denoisers import denoiser_out
from .resume import unreadable_checkpoint
from .sharded import is_sharded


class StageModule(L.LightningModule):
    active: tuple[str, ...] = (TSCD,)   # the adapters the stage runs...
    trained: tuple[str, ...] = (TSCD,)  # ...and those of them it trains (the others stay frozen)

    def __init__(self, unet, schedule: NoiseSchedule, seed: int = 0, encoder: nn.Module | None = None,
                 fsdp: bool = False):
        super().__init__()
        self.unet, self.schedule, self.seed = unet, schedule, seed
        self.adapters = Adapters(unet)
        self.encoder = encoder  # frozen VAE + text encoders (SD worlds); None when batches hold x0/cond
        # Under FSDP every wrapped block must run (no early exit from the UNet), and the trained tensors,
        # which FSDP ignores (see hsd.lit.strategies), have their gradients averaged here.
        self.fsdp = fsdp
        self.automatic_optimization = False

    steps_per_update = 1  # optimizer steps per batch (Lightning's global_step counts every one)
    accumulate = 1
    grad_norms_every = 0  # trainer.grad_norms_every, set by hsd.train: log each loss term's gradient norm

    def log_grad_norms(self, terms: dict[str, Tensor], params, batch: RawBatch) -> None:
        """grad/<term>: the norm of each weighted loss term's gradient over the trained tensors, every
        `grad_norms_every` batches. A weight is judged by the gradient its term contributes, not by its loss
        value. One extra backward per term (graph retained); single-process runs only: under DDP/FSDP,
        autograd.grad bypasses the gradient reducers."""
        every = self.grad_norms_every
        if not every or int(batch["index"]) % every or self.trainer.world_size > 1:
            return
        params = [p for p in params if p.requires_grad]
        for name, term in terms.items():
            if not term.requires_grad:
                continue
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            self.log(f"grad/{name}", norm)

    def use_adapters(self) -> None:
        """Set the declared adapters running and trainable; a subclass calls it once its declaration is final
        (`hsd.train` runs each stage inside `Adapters.restoring`, so the state is put back after the stage)."""
        self.adapters.use(self.active, self.trained)

    def on_train_batch_start(self, batch: RawBatch, batch_idx: int) -> None:
        for key in COUNTS:  # the data's undecodable / uncaptioned samples so far, summed over ranks, in every stage
            if key in batch:
                self.log(f"data/{key}", float(batch[key]), reduce_fx="sum", sync_dist=True)

    def completes_update(self, batch: RawBatch) -> bool:
        """Whether this micro-batch is the last of an optimizer update (gradient accumulation)."""
        return (micro_batch(int(batch["index"]), self.trainer.world_size) + 1) % self.accumulate == 0

    def generator(self, batch: RawBatch) -> torch.Generator:
        """Seeded by the batch's global index, so a resumed run draws exactly what the uninterrupted one did."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(batch["index"]) + 7)

    def encode(self, batch: RawBatch, g: torch.Generator) -> Batch:
        return batch if self.encoder is None else self.encoder(batch, g)

    def out(self, x: Tensor, t: Tensor, cond, unet: nn.Module | None = None,
            tensors: dict[str, Tensor] | None = None) -> Tensor:
        """The network's output at (x, t): eps (VP) or the velocity (flow); the schedule says what it is given as t.
        `tensors`: run with these in place of the module's own, by name (the EMA target; names checked by its owner,
        since functional_call needs strict=False for the tensors it is not given)."""
        return denoiser_out(unet or self.unet, x, self.schedule.model_time(t), cond, tensors)

    def student_out(self, x: Tensor, t: Tensor, cond) -> Tensor:
        """The network being trained (the UNet with its active adapters, unless a stage trains a copy)."""
        return self.out(x, t, cond)

    def denoise(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """One student step with gradient: x0 predicted from x_t (t [B])."""
        return self.schedule.x0(x_t, self.student_out(x_t, t, cond), t)

    def teacher_out(self, x: Tensor, t: Tensor, cond) -> Tensor:
        with self.teacher():
            return self.out(x, t, cond)

    def teacher(self):
        """Context: the UNet runs as the frozen teacher (every adapter off), restored on exit."""
        return self.adapters.off()

    def _step(self, opt, clip: float = 0.0) -> None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if self.fsdp:  # whole tensors: averaged here; sharded copies: reduce-scattered (averaged) in backward
            if self.trainer.world_size > 1:
                for p in params:
                    if not is_sharded(p):
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= self.trainer.world_size
            if clip:  # Lightning refuses norm clipping under FSDP; torch's takes whole and sharded tensors alike
                torch.nn.utils.clip_grad_norm_(params, clip)
        elif clip:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- checkpoints hold what training changes (+ optimizers, which Lightning adds) ----
    def trained_tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def trained_copies(self) -> list[nn.Module]:
        """Whole networks the stage trains (not adapters): under FSDP they are sharded (`hsd.lit.sharded`)."""
        return []

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the trained tensors, read directly: never the frozen weights, and no FSDP gather of them."""
        out = OrderedDict() if destination is None else destination
        for k, t in self.trained_tensors().items():
            out[prefix + k] = t if keep_vars else t.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self.trained_tensors()
        missing = sorted(set(own) - set(state_dict))
        shaped = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or shaped:  # another recipe's or another model's checkpoint in this stage's folder
            path = self._trainer.ckpt_path if self._trainer is not None else "the stage checkpoint"
            why = (f"it lacks {len(missing)} of this stage's trained tensors, e.g. {missing[0]}" if missing else
                   f"its {shaped[0]} has shape {tuple(state_dict[shaped[0]].shape)}, this stage's "
                   f"{tuple(own[shaped[0]].shape)}")
            raise unreadable_checkpoint(path, f"not this stage's: {why}")
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(state_dict[k])
        return _IncompatibleKeys([], [k for k in state_dict if k not in own])


@contextmanager
def no_checkpointing(unet):
    was = unet.is_gradient_checkpointing
    if was:
        unet.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if was:
            unet.enable_gradient_checkpointing()


def adamw(kind: str):
    if kind == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise MissingPackageError("tscd.optimizer=adamw8bit needs bitsandbytes: pip install 'hsd[bnb]'") from e
    return bnb.optim.AdamW8bit
