"""Live tensor bytes of one training step, counted op by op: under torch's FakeTensorMode for the real
architectures (shapes only: no weights, no arithmetic), or on real tensors to check the model.

`LiveBytes` is a dispatch mode that adds the bytes of every storage an op allocates and subtracts them when the
storage is freed. It keeps five streams, because strategies treat them differently: activations and temporaries,
gradients of tensors every rank holds whole (LoRA, discriminator), gradients of tensors FSDP shards (the full
DMD copies), autocast's low-precision copies of weights that FSDP's mixed precision gathers in bf16 instead, and
temporaries FSDP shards (the optimizer's foreach buffers of the full copies). Every allocation appends the streams
to a timeline, so the peak can be taken for any strategy afterwards.

Under FakeTensorMode, an op whose tensor inputs are all real (timesteps, indices, the noise schedule) and a
factory op whose output is small run on real tensors, so the step's data-dependent bookkeeping (grids, random
draws, `.tolist()`) works as in training while every tensor derived from the model stays fake.
"""
from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

ACT, GRAD, GRAD_SHARDED, CAST, ACT_SHARDED = range(5)
SMALL = 64 * 2**20  # a factory op's output up to this size runs on real tensors under FakeTensorMode


def _tensors(xs):
    for x in xs:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from _tensors(x)
        elif isinstance(x, dict):
            yield from _tensors(x.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated while the mode is on, in five streams, with a timeline of every rise.

    cast_sources: weights whose autocast copies (aten._to_copy of them) count as CAST rather than ACT."""

    current: LiveBytes | None = None  # the innermost one running (Replay reads it)

    def __init__(self, cast_sources=()):
        super().__init__()
        self.outer = None
        self.streams = [0, 0, 0, 0, 0]
        self.events: list[tuple[int, int, int, int, int]] = []
        self.records = WeakIdKeyDictionary()  # storage -> [bytes, stream]
        self.cast_sources = WeakIdKeyDictionary({t.untyped_storage(): True for t in cast_sources})
        self.hooks = []
        self.placeholders = 0
        self.stack: list[str] = []   # what runs now (labelled modules, backward), for each event's phase
        self.phases: list[str] = []

    @property
    def peak(self) -> int:
        return max((sum(e) for e in self.events), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = list(_tensors((args, kwargs)))
        fake = any(isinstance(t, FakeTensor) for t in inputs)
        if func is torch.ops.aten._local_scalar_dense.default and fake:
            return self.placeholder(inputs[0])
        if inputs and not fake:
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
            if not inputs and isinstance(out, FakeTensor) and out.untyped_storage().nbytes() <= SMALL:
                with unset_fake_temporarily():
                    out = func(*args, **kwargs)
        stream = CAST if func is torch.ops.aten._to_copy.default and inputs and \
            inputs[0].untyped_storage() in self.cast_sources else ACT
        seen = {id(t.untyped_storage()) for t in inputs}
        for t in _tensors(out if isinstance(out, (list, tuple)) else (out,)):
            st = t.untyped_storage()
            if id(st) not in seen and st not in self.records:
                self.add(st, stream)
        return out

    def placeholder(self, t: torch.Tensor):
        """A model tensor's value read in Python (.item(): range checks, NaN guards) has none under FakeTensorMode:
        a value inside every check's range stands in (0.5, 0, False); shapes never depend on it."""
        self.placeholders += 1
        return False if t.dtype == torch.bool else 0.5 if t.is_floating_point() else 0

    def add(self, storage, stream: int) -> None:
        record = [storage.nbytes(), stream]
        self.records[storage] = record
        self.streams[stream] += record[0]
        self.events.append(tuple(self.streams))
        self.phases.append(self.stack[-1] if self.stack else "step")
        weakref.finalize(storage, self._free, record)

    def _free(self, record) -> None:
        self.streams[record[1]] -= record[0]

    def extra(self, act: int = 0, sharded: int = 0, phase: str | None = None) -> None:
        """A moment with `act` (whole) and `sharded` bytes more than now, e.g. the optimizer's temporaries."""
        s = self.streams
        self.events.append((s[ACT] + act, s[GRAD], s[GRAD_SHARDED], s[CAST], s[ACT_SHARDED] + sharded))
        self.phases.append(phase or (self.stack[-1] if self.stack else "step"))

    def label(self, modules: dict[str, torch.nn.Module]) -> None:
        """Name the phase of every event inside these modules' forward calls ("(no grad)" added outside autograd)."""
        def push(name):
            def hook(module, args) -> None:
                self.stack.append(name + ("" if torch.is_grad_enabled() else " (no grad)"))
            return hook

        def pop(*args) -> None:
            self.stack.pop()
        for name, m in modules.items():
            self.hooks.append(m.register_forward_pre_hook(push(name)))
            self.hooks.append(m.register_forward_hook(pop, always_call=True))

    def as_grad(self, tensor: torch.Tensor, sharded: bool) -> None:
        """Move a gradient's storage from the activation stream to its gradient stream."""
        record = self.records.get(tensor.untyped_storage())
        if record is not None and record[1] == ACT:
            self.streams[ACT] -= record[0]
            record[1] = GRAD_SHARDED if sharded else GRAD
            self.streams[record[1]] += record[0]

    def watch_grads(self, params, sharded: bool) -> None:
        for p in params:  # a tensor trained later in the step (DMD's fake LoRA) may not require grad yet
            flag = p.requires_grad
            p.requires_grad_(True)
            self.hooks.append(p.register_post_accumulate_grad_hook(
                lambda p, sharded=sharded: self.as_grad(p.grad, sharded)))
            p.requires_grad_(flag)

    def __enter__(self):
        self.outer, LiveBytes.current = LiveBytes.current, self
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        LiveBytes.current = self.outer
        return super().__exit__(*exc)


class _FakeMode(FakeTensorMode):
    """FakeTensorMode asks torch.cuda.is_available() at every op (a tenth of a trace's time): asked once here."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self._avoid_device_init = not torch.cuda.is_available()

    @property
    def avoid_device_init(self) -> bool:
        return self._avoid_device_init


def fake_mode() -> FakeTensorMode:
    return _FakeMode()


class Replay:
    """Repeated no-grad calls of a UNet with the same input shapes, adapters and autocast state hold the same
    memory: the first is traced, the later ones add its peak to the timeline and return new outputs of its shapes.
    (The feedback stage's denoising steps, the teacher's CFG calls: a trace of the SDXL stages takes half as long.)
    Calls with gradient, and calls with forward hooks on the UNet's blocks (the discriminator's features), run."""

    def __init__(self, *unets):
        self.memo: dict[tuple, tuple[int, object]] = {}
        for unet in unets:
            unet.forward = self._wrap(unet, unet.forward)

    def _wrap(self, unet, forward):
        from peft.tuners.tuners_utils import BaseTunerLayer

        from ..models.denoisers import denoiser_blocks
        blocks = denoiser_blocks(unet)
        layer = next((m for m in unet.modules() if isinstance(m, BaseTunerLayer)), None)

        def call(*args, **kwargs):
            tracker = LiveBytes.current
            if tracker is None or torch.is_grad_enabled() or any(b._forward_hooks for b in blocks):
                return forward(*args, **kwargs)
            key = (id(unet), _signature((args, kwargs)),
                   layer and (tuple(layer.active_adapters), layer.disable_adapters), torch.is_autocast_enabled("cpu"),
                   torch.get_autocast_dtype("cpu"))
            if key in self.memo:
                peak, spec = self.memo[key]
                tracker.extra(act=peak)
                return _build(spec)
            start, base = len(tracker.events), sum(tracker.streams)
            out = forward(*args, **kwargs)
            self.memo[key] = (max((sum(e) for e in tracker.events[start:]), default=base) - base, _spec(out))
            return out
        return call


def _signature(x):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype, x.device.type
    if isinstance(x, (list, tuple)):
        return tuple(_signature(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _signature(v)) for k, v in x.items())
    return x


def _spec(out):
    """The structure, shapes and dtypes of an output, without holding its tensors."""
    if isinstance(out, torch.Tensor):
        return torch.Size(out.shape), out.dtype
    if hasattr(out, "to_tuple"):  # diffusers' output dataclasses
        return type(out), [_spec(v) for v in out.to_tuple()]
    if isinstance(out, (list, tuple)):
        return type(out), [_spec(v) for v in out]
    return None, out


def _build(spec):
    """A new output from `_spec` (contents are not needed: shapes are)."""
    head, rest = spec
    if isinstance(head, torch.Size):
        return torch.empty(head, dtype=rest)
    if head is None:
        return rest
    items = [_build(v) for v in rest]
    return head(*items) if hasattr(head, "to_tuple") else head(items)


def fakeify(mode: FakeTensorMode, *modules) -> None:
    """Replace the meta parameters and buffers of `modules` by fake CPU tensors of the same shapes and dtypes."""
    convert = mode.fake_tensor_converter.from_meta_and_device
    cpu = torch.device("cpu")
    for module in modules:
        for m in module.modules():
            for k, p in m._parameters.items():
                if p is not None and p.is_meta:
                    m._parameters[k] = torch.nn.Parameter(convert(mode, p.data, cpu), requires_grad=p.requires_grad)
            for k, b in m._buffers.items():
                if b is not None and b.is_meta:
                    m._buffers[k] = convert(mode, b, cpu)


class _Optimizer:
    """Stands in for an optimizer inside a traced step: step() marks the foreach temporaries (their size, given),
    zero_grad frees the gradients as the stage's `_step` does."""

    def __init__(self, params, tracker: LiveBytes, temp_whole: int, temp_sharded: int):
        self.param_groups = [{"params": list(params)}]
        self.tracker, self.temp = tracker, (temp_whole, temp_sharded)

    def step(self, closure=None):
        self.tracker.extra(*self.temp, phase="optimizer step")

    def zero_grad(self, set_to_none: bool = True):
        for p in self.param_groups[0]["params"]:
            p.grad = None


# CUDA's autocast runs these in float32 (torch's "CUDA ops that can autocast to float32"); CPU's autocast leaves
# most of them in bf16. Norms, softmax and pow among them make a UNet's activations about a third larger on a GPU.
CUDA_FP32 = frozenset("""__pow__ __rdiv__ __rpow__ __rtruediv__ acos asin binary_cross_entropy_with_logits cosh
cosine_embedding_loss cdist cosine_similarity cross_entropy cumprod cumsum dist erfinv exp expm1 group_norm
hinge_embedding_loss kl_div l1_loss layer_norm log log_softmax log10 log1p log2 margin_ranking_loss mse_loss
multilabel_margin_loss multi_margin_loss nll_loss norm normalize pdist poisson_nll_loss pow prod reciprocal rsqrt
sinh smooth_l1_loss soft_margin_loss softmax softmin softplus sum renorm tan triplet_margin_loss""".split())


class CudaAutocast(TorchFunctionMode):
    """Inside CPU autocast, cast the floating inputs of CUDA's float32 ops to float32 first, as CUDA's autocast
    does (the casts are recorded by autograd there too), so a trace on fake CPU tensors holds what a GPU holds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in CUDA_FP32 and torch.is_autocast_enabled("cpu"):
            up = lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextmanager
def _recompute_with_cuda_autocast():
    """A backward pass runs outside every torch-function mode, so activation checkpointing's recomputation would
    miss `CudaAutocast` (and its dtypes would differ from the forward's): give non-reentrant checkpoints (diffusers'
    default) a recompute context that enters it."""
    import torch.utils.checkpoint as ckpt
    original = ckpt.checkpoint

    def checkpoint(function, *args, use_reentrant=None, context_fn=None, **kwargs):
        if use_reentrant is False and context_fn is None:
            context_fn = lambda: (nullcontext(), CudaAutocast())  # noqa: E731
        extra = {} if context_fn is None else {"context_fn": context_fn}
        return original(function, *args, use_reentrant=use_reentrant, **extra, **kwargs)
    ckpt.checkpoint = checkpoint
    try:
        yield
    finally:
        ckpt.checkpoint = original


def autocast(precision: str, device: str = "cuda"):
    """The context Lightning's precision plugin runs training_step in, with CUDA's float32 ops on `device` cuda."""
    half = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}
    if precision not in half:
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=half[precision], cache_enabled=False))  # as Lightning's plugin
    if device == "cuda":
        stack.enter_context(_recompute_with_cuda_autocast())
        stack.enter_context(CudaAutocast())
    return stack


def trace_step(module, batch: dict, groups: list[tuple[list, set, int, int]], precision: str,
               accumulate: int = 1, mode: FakeTensorMode | None = None, cast_sources=(),
               labels: dict[str, torch.nn.Module] | None = None, device: str = "cuda") -> LiveBytes:
    """Run `module.training_step(batch, 0)` outside Lightning, recording live bytes (a LiveBytes).

    groups: one (params, sharded param ids, foreach temp bytes whole, sharded) per optimizer, in the order the
    module's configure_optimizers returns them. With accumulate > 1 the trained tensors start with gradients, as
    in the last micro-batch of an update. device: cuda runs autocast with CUDA's float32 ops (`CudaAutocast`).
    """
    tracker = LiveBytes(cast_sources)
    opts = [_Optimizer(params, tracker, tw, ts) for params, _, tw, ts in groups]
    module._trainer = SimpleNamespace(optimizers=opts, world_size=1, global_rank=0)
    module.optimizers = lambda use_pl_optimizer=True: opts if len(opts) > 1 else opts[0]

    def backward(loss, *args, **kwargs):
        tracker.stack.append("backward")
        loss.backward(*args, **kwargs)
        tracker.stack.pop()
    module.manual_backward = backward
    module.log = module.log_dict = module.clip_gradients = lambda *a, **k: None
    module.completes_update = lambda batch: True
    with mode or nullcontext(), tracker:
        tracker.label(labels or {})
        for params, sharded, _, _ in groups:
            whole = [p for p in params if id(p) not in sharded]
            tracker.watch_grads(whole, False)
            tracker.watch_grads([p for p in params if id(p) in sharded], True)
            if accumulate > 1:
                for p in params:
                    p.grad = torch.zeros_like(p)
                    tracker.as_grad(p.grad, id(p) in sharded)
        with autocast(precision, device):
            module.training_step(batch, 0)
        for params, *_ in groups:
            for p in params:
                p.grad = None
    return tracker
