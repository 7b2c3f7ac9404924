"""Sharded full fine-tunes (hsd.lit.sharded): DMD's one-step generator and fake score split over CPU processes
(gloo) with FSDP2 train as unsharded DDP does, and a run stopped and resumed from its folder checkpoint ends bit
for bit where the uninterrupted one ends; folder checkpoints are written atomically."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hsd.lit import sharded
from hsd.lit.trainer import last_checkpoint
from hsd.models.components import build_components

ROOT = Path(__file__).resolve().parent.parent
HSD = [str(Path(sys.executable).parent / "hsd")]
FSDP = [sys.executable, str(ROOT / "tests" / "fsdp_lightning_cpu.py")]  # Lightning's FSDP, allowed on CPU
LR = 1e-4  # dmd.lr and dmd.fake_lr (the defaults)
ONE_STEP = ["dmd.generator=full", "dmd.fake=full", "dmd.timestep=800", "dmd.batch_size=1", "dmd.fake_updates=1"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_premises_on_cpu_processes(world):
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp2_cpu_worker.py"), str(world), str(29570 + world)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = re.findall(r"(ok|FAIL) (\S+) rank(\d)", r.stdout)
    assert r.returncode == 0 and len(results) == 5 * world, r.stdout + r.stderr[-2000:]
    assert all(status == "ok" for status, _, _ in results), r.stdout


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp("sharded")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo of thing {i}")
    return build_components("tiny-sd15").save_pretrained(root / "model"), images


def _train(sd15, out: Path, name: str, strategy: str, world: int, dmd_iterations: int, tscd: str) -> Path:
    model, images = sd15
    r = subprocess.run([*(FSDP if strategy == "fsdp" else HSD), "train", str(ROOT / "experiments/tiny/sd15.yaml"),
                        f"model.path={model}", f"data.folder={images}", f"out_dir={out}", f"name={name}",
                        f"trainer.devices={world}", f"trainer.strategy={strategy}", "trainer.ckpt_every=2",
                        "trainer.logger=csv", f"tscd.stages={tscd}", f"dmd.iterations={dmd_iterations}", *ONE_STEP],
                       capture_output=True, text=True, cwd=out, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out / name


def _unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet_onestep" / "diffusion_pytorch_model.safetensors")


def _losses(run: Path) -> dict[int, tuple[float, float]]:
    """{DMD step: (generator loss, fake-score loss)} from the stage's CSV log (the last run's rows win)."""
    rows = {}
    for f in sorted((run / "csv" / "dmd").rglob("metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/dmd_loss"):
                rows[int(row["step"])] = (float(row["train/dmd_loss"]), float(row["train/fake_loss"]))
    return rows


def _sharded_equals_unsharded_and_resumes(sd15, tmp_path, world: int, tscd: str) -> None:
    ddp = _train(sd15, tmp_path, "ddp", "ddp", world, 4, tscd)
    full = _train(sd15, tmp_path, "fsdp", "fsdp", world, 4, tscd)
    # sharded = unsharded: the losses of every step, and every trained tensor. Not bit for bit: DDP's all-reduce and
    # FSDP2's reduce-scatter round differently, and AdamW turns a rounding-level gradient (the biases before a
    # GroupNorm, whose true gradient is 0) into a step of up to lr; so the bound is half a step.
    a, b = _losses(ddp), _losses(full)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert all(torch.allclose(torch.tensor(a[s]), torch.tensor(b[s]), rtol=1e-4) for s in a), (a, b)
    u, v = _unet(ddp), _unet(full)
    assert u.keys() == v.keys() and all((u[k] - v[k]).abs().max() <= LR / 2 for k in u)
    assert any((v[k] - load_file(sd15[0] / "unet" / "diffusion_pytorch_model.safetensors")[k]).abs().max() > 0
               for k in v)  # it trained
    # stop after 2 updates, resume to 4: bit for bit the uninterrupted sharded run
    cut = _train(sd15, tmp_path, "cut", "fsdp", world, 2, tscd)
    ckpt = last_checkpoint(cut / "dmd")
    assert ckpt.is_dir() and {".metadata", sharded.META} <= {p.name for p in ckpt.iterdir()}
    assert len(list(ckpt.glob("*.distcp"))) == world  # each rank wrote its shards
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.ckpt"]  # no temp folder left behind
    for p in (cut / "unet_onestep").iterdir():  # as if the run had died before its stage ended
        p.unlink()
    (cut / "unet_onestep").rmdir()
    resumed = _train(sd15, tmp_path, "cut", "fsdp", world, 4, tscd)
    w = _unet(resumed)
    assert w.keys() == v.keys() and all(torch.equal(w[k], v[k]) for k in v)
    assert {s: _losses(resumed)[s] for s in (2, 3)} == {s: b[s] for s in (2, 3)}


@pytest.mark.slow
def test_two_processes_tscd_lora_then_sharded_one_step_unet(sd15, tmp_path):
    """The FSDP1-wrapped UNet of a TSCD LoRA stage hands its fused copy to the sharded DMD stage."""
    _sharded_equals_unsharded_and_resumes(sd15, tmp_path, 2, "[{k: 2, grid_steps: 8, iterations: 2}]")


@pytest.mark.slow
def test_four_processes_sharded_one_step_unet(sd15, tmp_path):
    _sharded_equals_unsharded_and_resumes(sd15, tmp_path, 4, "[]")


# ---- folder checkpoints are atomic (one process: torch.distributed.checkpoint runs without a process group) ----
class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))

    def trained_tensors(self):
        return {"w": self.w}


def _strategy(module) -> SimpleNamespace:
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    return SimpleNamespace(is_global_zero=True, broadcast=lambda x: x, barrier=lambda *_: None, optimizers=[opt],
                           checkpoint_io=TorchCheckpointIO())


def _step(module, strategy) -> None:
    module.w.grad = torch.ones_like(module.w)
    strategy.optimizers[0].step()


def test_folder_checkpoint_round_trip_and_a_crash_keeps_the_previous_one(tmp_path, monkeypatch):
    module, path = _Module(), tmp_path / "checkpoints" / "last.ckpt"
    strategy = _strategy(module)
    _step(module, strategy)
    sharded.save_sharded(strategy, {"global_step": 1, "state_dict": {}, "optimizer_states": [{"param_groups": []}]},
                         module, path)
    saved = module.w.detach().clone(), strategy.optimizers[0].state[module.w]["exp_avg"].clone()
    _step(module, strategy)

    def crash(*_, **__):
        raise RuntimeError("disk full")
    monkeypatch.setattr("torch.distributed.checkpoint.save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        sharded.save_sharded(strategy, {"global_step": 2}, module, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the old folder, no temp folder
    monkeypatch.undo()

    fresh = _Module()
    fresh_strategy = _strategy(fresh)
    meta = sharded.load_sharded(fresh_strategy, fresh, path)
    assert meta["global_step"] == 1 and meta["sharded"] and meta["optimizer_states"] == [{"param_groups": []}]
    assert torch.equal(fresh.w, saved[0]) and torch.equal(fresh_strategy.optimizers[0].state[fresh.w]["exp_avg"],
                                                          saved[1])


def test_a_crash_between_the_renames_resumes_from_the_previous_folder(tmp_path):
    stage = tmp_path / "dmd"
    old = stage / "checkpoints" / ".last.ckpt.hsd-tmp-old"  # hsd.io.atomic_dir's name for it while the new moves in
    old.mkdir(parents=True)
    assert last_checkpoint(stage) == old
    (stage / "checkpoints" / "last.ckpt").mkdir()
    assert last_checkpoint(stage) == stage / "checkpoints" / "last.ckpt"


def test_several_nodes_without_a_launcher_are_refused(monkeypatch):
    """The shipped recipes say 4 nodes: started by hand on one machine, Lightning would wait for the other 3."""
    from hsd.errors import ConfigError
    from hsd.lit.trainer import LAUNCHERS, check_launcher
    for key in LAUNCHERS:
        monkeypatch.delenv(key, raising=False)
    check_launcher(1)
    with pytest.raises(ConfigError, match="num_nodes=4, but this process was not started by srun or torchrun"):
        check_launcher(4)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    check_launcher(4)


@pytest.mark.parametrize("fault", ["torn shard", "torn metadata", "no meta.pt"])
def test_a_corrupt_folder_checkpoint_is_one_line_and_left_as_it_is(tmp_path, fault):
    from hsd.lit.resume import ResumeError
    module, path = _Module(), tmp_path / "checkpoints" / "last.ckpt"
    strategy = _strategy(module)
    _step(module, strategy)
    sharded.save_sharded(strategy, {"global_step": 1, "state_dict": {}, "optimizer_states": [{"param_groups": []}]},
                         module, path)
    victim = {"torn shard": next(path.glob("*.distcp")), "torn metadata": path / ".metadata",
              "no meta.pt": path / "meta.pt"}[fault]
    if fault == "no meta.pt":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(ResumeError, match=rf"resume checkpoint {path} cannot be read \(.*\); it was left as it is: "
                                          rf"move it aside \(mv {path} {path}.bad\)") as err:
        fresh = _Module()
        sharded.load_sharded(_strategy(fresh), fresh, path)
    assert "\n" not in str(err.value) and {p.name: p.read_bytes() for p in path.iterdir()} == before
