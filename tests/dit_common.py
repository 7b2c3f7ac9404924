"""Helpers shared by tests/test_sd3.py and tests/test_flux.py: a captioned image folder, the CLI, and the two
end-to-end checks both transformers must pass (an exact resume; 2-process DDP = 2-process FSDP)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
HSD = [sys.executable, "-m", "hsd.cli"]


def captioned_images(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of thing {i}")
    return folder


def hsd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*HSD, *args], capture_output=True, text=True, cwd=cwd)


def check_resume_is_exact(config: str, model: Path, images: Path, tmp_path: Path) -> None:
    """2 updates, stop, resume to 4 == 4 uninterrupted updates, bit for bit (velocity targets, Euler jumps)."""
    def train(name: str, iterations: int) -> Path:
        r = hsd("train", str(ROOT / config), f"model.path={model}", f"data.folder={images}", f"out_dir={tmp_path}",
                f"name={name}", "trainer.ckpt_every=2", "dmd.iterations=0",
                f"tscd.stages=[{{k: 2, grid_steps: 8, iterations: {iterations}}}]", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        return tmp_path / name / "lora_stage0_k2.safetensors"

    full = load_file(train("full", 4))
    cut = train("cut", 2)
    cut.unlink()  # as if the run had died before its stage ended
    resumed = load_file(train("cut", 4))
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)


def check_ddp_equals_fsdp(config: str, model: Path, images: Path, tmp_path: Path) -> None:
    """2-process DDP and 2-process FSDP (the frozen transformer sharded on its blocks, the LoRA whole on every rank)
    train the same TSCD LoRA, to rounding."""
    fsdp = [sys.executable, str(ROOT / "tests" / "fsdp_lightning_cpu.py")]  # Lightning's FSDP, allowed on CPU
    files = {}
    for strategy, cmd in (("ddp", HSD), ("fsdp", fsdp)):
        r = subprocess.run([*cmd, "train", str(ROOT / config), f"model.path={model}", f"data.folder={images}",
                            f"out_dir={tmp_path}", f"name={strategy}", "trainer.devices=2",
                            f"trainer.strategy={strategy}", "feedback.iterations=0", "dmd.iterations=0",
                            "tscd.stages=[{k: 2, grid_steps: 8, iterations: 2}]"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "distributed_backend=gloo" in r.stderr and "All distributed processes registered" in r.stderr
        files[strategy] = load_file(tmp_path / strategy / "lora_stage0_k2.safetensors")
    a, b = files["ddp"], files["fsdp"]
    assert a.keys() == b.keys() and all(k.startswith("transformer.") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it trained: B left zero


def train_whole_plan(config: str, model: Path, images: Path, tmp_path: Path, *overrides: str,
                     stderr: list | None = None) -> list[Path]:
    """TSCD 8 -> 4 -> 2 -> 1, the feedback LoRA (a random tiny Aes scorer) and DMD through `hsd train`; the six LoRA
    files, each in the diffusers transformer layout (no kohya files: those are UNet files), the last stage trained.
    `stderr` collects the run's."""
    from safetensors import safe_open

    from hsd.scorers.random_weights import write_random_scorers
    write_random_scorers(tmp_path / "scorers", "tiny")
    r = hsd("train", str(ROOT / config), f"model.path={model}", f"data.folder={images}", f"out_dir={tmp_path}",
            "name=run", "feedback.iterations=2", "feedback.batch_size=2", "feedback.steps=2",
            f"feedback.scorers={tmp_path / 'scorers'}", "feedback.rewards={Aes: {margin: 100.0, weight: 1.0}}",
            *overrides, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    if stderr is not None:
        stderr.append(r.stderr)
    out = tmp_path / "run"
    files = [out / f"lora_stage{i}_k{k}.safetensors" for i, k in enumerate((8, 4, 2, 1))]
    files += [out / "lora_feedback.safetensors", out / "lora_unified.safetensors"]
    for f in files:
        with safe_open(f, "pt") as h:
            assert all(k.startswith("transformer.") for k in h.keys()), f
    assert not list(out.glob("*.kohya.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in load_file(files[3]).items() if "lora_B" in k)
    assert "--scheduler euler" in (out / "loras.md").read_text()
    return files
