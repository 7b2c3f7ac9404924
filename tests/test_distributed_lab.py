"""Two CPU processes (DDP on gloo) on the lab: they train, draw disjoint batches, and a crashed run resumes to
exactly the uninterrupted result."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["train", str(ROOT / "experiments" / "lab" / "tscd.yaml"), "trainer.devices=2", "trainer.strategy=ddp",
        "tscd.stages=[{k: 2, grid_steps: 16, iterations: 4}]", "tscd.batch_size=8", "trainer.ckpt_every=2",
        "trainer.progress_bar=false", "lab.eval_per_class=4", "lab.student_steps=[1]", "lab.teacher_steps=2"]


def _run(out: Path, record: Path, stop_at: int | None = None) -> subprocess.CompletedProcess:
    record.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HSD_TEST_RECORD": str(record), "OMP_NUM_THREADS": "1"}
    if stop_at is not None:
        env["HSD_TEST_STOP_AT"] = str(stop_at)
    return subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_lab_cpu.py"), *ARGS, f"out_dir={out}",
                           "name=ddp"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


def _draws(record: Path, rank: int) -> list[tuple[int, str]]:
    return [tuple(line.split()) for line in (record / f"rank{rank}.txt").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_lab_run_draws_disjoint_batches_and_resumes_exactly(tmp_path):
    full = _run(tmp_path / "full", tmp_path / "rec_full")
    assert full.returncode == 0, full.stderr[-3000:]
    ranks = [_draws(tmp_path / "rec_full", r) for r in (0, 1)]
    # micro-batch b of rank r has global index 2 b + r: 4 each, and no sample drawn twice
    assert [[int(i) for i, _ in draws] for draws in ranks] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert not {s for _, s in ranks[0]} & {s for _, s in ranks[1]}
    lora = load_file(tmp_path / "full" / "ddp" / "lora_stage0_k2.safetensors")
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)  # it trained

    crashed = _run(tmp_path / "cut", tmp_path / "rec_cut", stop_at=2)
    assert crashed.returncode != 0 and (tmp_path / "cut" / "ddp" / "stage0_k2" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "cut" / "ddp" / "lora_stage0_k2.safetensors").exists()
    resumed = _run(tmp_path / "cut", tmp_path / "rec_resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed run draws only the batches after the checkpoint, and ends where the uninterrupted run ended
    assert [[int(i) for i, _ in _draws(tmp_path / "rec_resumed", r)] for r in (0, 1)] == [[4, 6], [5, 7]]
    again = load_file(tmp_path / "cut" / "ddp" / "lora_stage0_k2.safetensors")
    assert lora.keys() == again.keys() and all(torch.equal(lora[k], again[k]) for k in lora)
