"""hsd memory: the per-rank memory model against the measured peak of real training steps (tiny-sd15 on the CPU,
through the LightningModules and Lightning's Trainer), the SDXL one-step UNet's state under DDP and FSDP, the CLI."""
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from hsd.data.batch import EpochLoader, IndexedBatches
from hsd.diffusion.schedule import NoiseSchedule
from hsd.lit.dmd import DMDModule
from hsd.lit.tscd import TSCDModule
from hsd.memory import GIB, TOTAL, Footprint, per_rank, settle, state
from hsd.memory.stage import footprints, load_run
from hsd.memory.trace import LiveBytes
from hsd.models.adapters import FAKE, TSCD, Adapters
from hsd.models.components import build_components
from hsd.models.conditioning import LatentEncoder, TextConditioner
from hsd.models.discriminator import build_discriminator

pytestmark = [pytest.mark.filterwarnings("ignore:Found .* module.* in eval mode"),  # frozen parts, on purpose
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:DeprecationWarning")]
ROOT = Path(__file__).resolve().parent.parent
HSD = [sys.executable, "-m", "hsd.cli"]
TINY = ["world=sd15", "model.resolution=64", "model.frozen_dtype=bfloat16", "trainer.precision=bf16-mixed",
        "lora.rank=8", "lora.alpha=8"]
DMD = ["tscd.stages=[]", "dmd.iterations=2", "dmd.batch_size=2", "dmd.fake_updates=2", "dmd.w_mse=0.25",
       "dmd.mse_steps=3"]
RECIPES = {  # one of each kind: TSCD (accumulating, checkpointed), TSCD + discriminator, DMD LoRA/LoRA, full/full
    #          (checkpointed copies)
    "tscd": ["tscd.stages=[{k: 4, grid_steps: 16, iterations: 2}]", "tscd.batch_size=2", "tscd.accumulate=2",
             "model.gradient_checkpointing=true"],
    "tscd w_adv>0": ["tscd.stages=[{k: 2, grid_steps: 16, iterations: 2, w_adv: 0.5}]", "tscd.batch_size=2",
                     "tscd.adv.hidden=32"],
    "dmd lora/lora": DMD,
    "dmd full/full": [*DMD, "dmd.generator=full", "dmd.fake=full", "dmd.timestep=800",
                      "model.gradient_checkpointing=true"],
}


def real_module(cfg):
    """The stage's module on random tiny-sd15 weights, wired as hsd.worlds.sd and hsd.train wire it."""
    c = build_components("tiny-sd15", seed=0)
    unet = c.unet.to(torch.bfloat16)
    for enc in c.text_encoders:
        enc.to(torch.bfloat16)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    encoder = LatentEncoder(c.vae, TextConditioner(c.family, c.text_encoders, c.tokenizers), cfg.model.resolution)
    schedule = NoiseSchedule.from_scheduler(c.scheduler)
    adapters = Adapters(unet)
    adapters.attach(TSCD, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    d = cfg.dmd
    if not d.iterations:
        disc = build_discriminator(unet, cfg.tscd.adv) if cfg.tscd.stages[0].w_adv else None
        return TSCDModule(unet, schedule, cfg.tscd.stages[0], cfg.tscd, encoder=encoder, disc=disc)
    if d.fake == "lora":
        adapters.attach(FAKE, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    checkpointing = cfg.model.gradient_checkpointing  # the copies exactly as the DMD stage makes them
    gen = adapters.trained_copy({TSCD: 1.0}, checkpointing) if d.generator == "full" else None
    fake = adapters.trained_copy({}, checkpointing) if d.fake == "full" else None
    return DMDModule(unet, schedule, d, None, generator_unet=gen, fake_unet=fake, encoder=encoder)


class Probe(L.Callback):
    """Peak live tensor bytes of one batch: what the module and its optimizers hold when it starts (weights,
    buffers, gradients, moments) plus the most that the step's new tensors add at any moment."""

    def __init__(self, index: int):
        self.index, self.tracker, self.peak = index, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.index:
            held = [*module.parameters(), *module.buffers()]
            held += [p.grad for p in module.parameters() if p.grad is not None]
            held += [v for o in trainer.optimizers for s in o.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor)]
            self.base = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values())
            self.tracker = LiveBytes().__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.index:
            self.tracker.__exit__(None, None, None)
            self.peak = self.base + self.tracker.peak


def measured_peak(cfg) -> int:
    """Two optimizer updates through Lightning's Trainer; the peak of the last micro-batch (moments exist, the
    update's gradients have accumulated). The raw image batches (host data) are not counted, as in the model."""
    module = real_module(cfg)
    size, res = (cfg.dmd.batch_size, cfg.model.resolution) if cfg.dmd.iterations else (cfg.tscd.batch_size,
                                                                                        cfg.model.resolution)

    def batch(i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"pixels": torch.rand(size, 3, res, res, generator=g) * 2 - 1, "captions": ["a red cube"] * size}

    micro = 2 * module.accumulate
    probe = Probe(micro - 1)
    trainer = L.Trainer(max_steps=2 * module.steps_per_update, accelerator="cpu", devices=1,
                        precision=cfg.trainer.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(module, train_dataloaders=EpochLoader(IndexedBatches(batch, 0, micro)))
    return probe.peak


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_model_is_within_15_percent_of_the_measured_peak(recipe):
    cfg = load_run([], [*TINY, *RECIPES[recipe]])
    torch.manual_seed(0)
    measured = measured_peak(cfg)
    [f] = footprints(cfg, arch="tiny-sd15", device="cpu")
    model = per_rank(f, "auto", 1)[TOTAL]
    print(f"{recipe}: measured {measured / 2**20:.2f} MiB, model {model / 2**20:.2f} MiB, "
          f"{100 * (model - measured) / measured:+.1f} %")
    assert abs(model - measured) <= 0.15 * measured


def test_sdxl_one_step_unet_needs_fsdp_on_8_gpus():
    """Full fp32 generator and fake-score copies with AdamW: sharded 8 ways they fit, replicated they do not."""
    cfg = load_run([str(ROOT / "experiments/sdxl/onestep_unet.yaml")], [])
    dmd = footprints(cfg, fsdp=True, activations=False)[-1]
    assert dmd.name == "dmd" and dmd.trained_sharded == 2 * 2_567_463_684 * 4  # the two fp32 UNet copies
    fsdp, ddp = state(per_rank(dmd, "fsdp", 8)), state(per_rank(dmd, "ddp", 8))
    assert fsdp < 40 * GIB < 80 * GIB < ddp


def test_sd3_medium_tscd_lora_shards_its_transformer_on_the_joint_blocks():
    """SD3-medium's real transformer (bf16, 2.03 B) is what FSDP shards; it is gathered one joint block at a time
    (the running one and the prefetched one, plus the root's embedders) and the LoRA stays whole."""
    from diffusers import SD3Transformer2DModel

    from hsd.models.dit import DIT_ARCHS
    cfg = load_run([str(ROOT / "experiments/sd3/tscd.yaml")], [])
    [f, *_] = footprints(cfg, fsdp=True, activations=False)
    with torch.device("meta"):
        net = SD3Transformer2DModel(**DIT_ARCHS["sd3"].transformer)
    n = sum(p.numel() for p in net.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in net.transformer_blocks]
    assert len(blocks) == 24 and f.frozen_sharded == 2 * n  # bfloat16
    assert f.gathered == (n - sum(blocks) + 2 * max(blocks)) * 2
    assert f.parts["transformer"] == 2 * n and "UNet" not in f.parts
    fsdp, one = per_rank(f, "fsdp", 8), per_rank(f, "auto", 1)
    assert fsdp["frozen weights"] < one["frozen weights"] - 3 * GIB


def test_flux_dev_tscd_lora_shards_its_double_and_single_blocks():
    """FLUX.1-dev's real transformer (bf16, 11.9 B) is sharded on its 19 + 38 blocks, gathered one at a time (plus the
    prefetched one and the root); T5-XXL and CLIP-L stay whole: 8 ranks hold under 16 GiB of frozen weights where one
    holds 31.8 GiB."""
    from diffusers import FluxTransformer2DModel

    from hsd.models.dit import DIT_ARCHS
    cfg = load_run([str(ROOT / "experiments/flux/tscd.yaml")], [])
    [f, *_] = footprints(cfg, fsdp=True, activations=False)
    with torch.device("meta"):
        net = FluxTransformer2DModel(**DIT_ARCHS["flux"].transformer)
    n = sum(p.numel() for p in net.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in [*net.transformer_blocks, *net.single_transformer_blocks]]
    assert len(blocks) == 57 and f.frozen_sharded == 2 * n
    assert f.gathered == (n - sum(blocks) + 2 * max(blocks)) * 2
    assert f.parts["transformer"] == 2 * n and abs(f.parts["text encoders"] / GIB - 9.34) < 0.01
    fsdp, one = per_rank(f, "fsdp", 8), per_rank(f, "auto", 1)
    assert fsdp["frozen weights"] < 16 * GIB and one["frozen weights"] > 31 * GIB


def test_flux_dev_on_one_gpu_quantized_and_cached():
    """settle: model.quantize replaces the transformer's Linear weights by torchao's bytes (int8 about half of bf16,
    NF4 about a quarter) plus one dequantized layer; data.cache drops T5-XXL, CLIP-L and the VAE of a TSCD stage."""
    from hsd.models.quantize import quantized_bytes
    cfg = load_run([str(ROOT / "experiments/flux/tscd.yaml")], [])
    [f, *_] = footprints(cfg, activations=False)
    assert settle(f) == f
    linear = f.linear
    assert 0.95 * f.frozen_sharded < linear < f.frozen_sharded  # nearly all of FLUX's transformer is Linear
    rows = {q: per_rank(settle(f, q), "auto", 1)["frozen weights"] for q in ("none", "int8", "nf4")}
    assert rows["none"] - rows["int8"] == pytest.approx(linear - f.quantized["int8"] - f.largest_linear)
    assert 0.49 < f.quantized["int8"] / linear < 0.51 and 0.25 < f.quantized["nf4"] / linear < 0.27
    assert f.quantized["nf4"] > 0 and quantized_bytes((3072, 3072), 2, "nf4") < 3072 * 3072 * 2 / 3.8
    cached = settle(f, "nf4", cached=True)
    assert set(f.uncached) == {"text encoders", "VAE"} and "text encoders" not in cached.parts
    assert f.frozen - settle(f, cached=True).frozen == pytest.approx(f.parts["text encoders"] + f.parts["VAE"])
    assert per_rank(cached, "auto", 1)["frozen weights"] < 8 * GIB < 31 * GIB < rows["none"]


@pytest.mark.slow
def test_hsd_memory_proposes_a_24_gib_setting_for_flux_dev():
    """The acceptance line of issue 23: FLUX.1-dev's TSCD LoRA does not fit one 24 GiB GPU as configured; hsd memory
    proposes the cheapest setting that does (a quantized base and the cache), and on 80 GiB none is needed."""
    r = subprocess.run([sys.executable, "-m", "hsd.cli", "memory", str(ROOT / "experiments/flux/tscd.yaml"), "--gpus",
                        "1", "--gpu-memory", "24", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.split("Cheapest one-GPU setting that fits 24 GiB")[1].splitlines()[1]
    assert "model.quantize=int8" in line and "data.cache=DIR" in line and "tscd.batch_size=1" in line
    r = subprocess.run([sys.executable, "-m", "hsd.cli", "memory", str(ROOT / "experiments/flux/tscd.yaml"), "--gpus",
                        "1", "--gpu-memory", "80", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0 and "Cheapest" not in r.stdout and "fits 80 GiB" in r.stdout


def test_per_rank_arithmetic():
    f = Footprint("dmd", 2, frozen=8, frozen_sharded=80, trained=4, trained_sharded=800, optimizer=8,
                  optimizer_sharded=1600, ddp_buckets=804, gathered=24,
                  events=[(200, 0, 0, 400, 0), (10, 4, 400, 0, 400)], phases=["UNet", "optimizer step"])
    ddp, fsdp, one = per_rank(f, "ddp", 8), per_rank(f, "fsdp", 8), per_rank(f, "auto", 1)
    assert ddp[TOTAL] == 88 + 804 + 1608 + 804 + 10 + 804 and ddp["peak during"] == "optimizer step"
    assert fsdp[TOTAL] == 18 + 104 + 208 + 24 + 200 and fsdp["peak during"] == "UNet"  # 1/8 shards, no casts
    assert fsdp["gradients (largest alive)"] == 54 and ddp["activations (largest alive)"] == 600
    assert ddp["gradients (largest alive)"] == 404 and fsdp["activations (largest alive)"] == 200
    assert one[TOTAL] == ddp[TOTAL] - 804  # one device: no DDP buckets


def test_cli_prints_the_table_and_a_bad_key_is_one_line():
    r = subprocess.run([*HSD, "memory", "experiments/sd15/tscd.yaml", "model.path=x", "data.folder=y", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Strategy assumed: ddp (trainer.strategy=ddp, 32 ranks)" in out
    assert "| tscd k=8 (micro-batch 8) | tscd k=4 (micro-batch 8) | tscd k=2 (micro-batch 8) | tscd k=1 (micro-batch " \
           "8) |" in out
    assert out.count("| **total (peak of the step)** |") == 1 and "| fits 80 GiB | yes | yes | yes | yes |" in out
    bad = subprocess.run([*HSD, "memory", "experiments/sd15/tscd.yaml", "tscd.lr_typo=1"], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown config key 'tscd.lr_typo'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_traces_run_autocast_as_cuda_does():
    """CUDA's autocast runs norms, softmax and pow in float32 (CPU's keeps them in bf16); a checkpointed block
    recomputes them the same way in backward (checkpoint looked up at call time, as diffusers does)."""
    import torch.utils.checkpoint

    from hsd.memory.trace import autocast
    norm = torch.nn.GroupNorm(8, 32).to(torch.bfloat16)
    x = torch.randn(2, 32, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    with autocast("bf16-mixed", "cuda"):
        y = torch.utils.checkpoint.checkpoint(lambda v: torch.nn.functional.silu(norm(v)), x, use_reentrant=False)
        assert y.dtype == torch.float32 and torch.softmax(x, -1).dtype == torch.float32
        torch.autograd.backward(y.sum())
    with autocast("bf16-mixed", "cpu"):
        assert norm(x).dtype == torch.bfloat16
