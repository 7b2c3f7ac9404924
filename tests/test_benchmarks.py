"""The benchmark scripts run (tiny models, CPU) and print what they promise; the numbers are in docs/sd.md."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_tscd_step_benchmark_prints_ratios():
    out = _run("tscd_step.py", "--resolution", "16", "--batch", "2", "--repeats", "1", "--warmup", "0")
    ratios = re.findall(r"ratio to baseline (\d+\.\d+)", out)
    assert len(ratios) == 3 and float(ratios[0]) == 1.0


def test_quantize_benchmark_times_the_three_bases_side_by_side():
    out = _run("quantize_step.py", "--width", "128", "--tokens", "64", "--repeats", "1", "--warmup", "0")
    rows = re.findall(r"\| (none|int8|nf4) \| (\d+\.\d) \| \d+\.\d \| ratio to baseline (\d+\.\d+) \|", out)
    assert [r[0] for r in rows] == ["none", "int8", "nf4"] and float(rows[0][2]) == 1.0
    assert float(rows[0][1]) > float(rows[1][1]) > float(rows[2][1])  # the frozen Linear bytes shrink


def test_sd_memory_benchmark_runs_checkpointing_with_discriminator_in_bf16():
    """Gradient checkpointing + the discriminator's LoRA-off pass + bf16 autocast, through Lightning."""
    out = _run("sd_train_memory.py", "--micro-batches", "1", "--steps", "1", "--warmup", "1")
    rows = [l for l in out.splitlines() if l.startswith("| 1 |")]
    assert len(rows) == 2 and "OOM" not in out
    assert re.search(r"1-step generation: .* ratio \d+\.\d+", out)


def test_eval_pass_benchmark_prints_ratio_and_identical_scores(tmp_path):
    out = _run("eval_pass.py", "--size", "tiny", "--n", "4", "--batch", "2", "--threads", "1",
               "--no-imagereward-reference", "--weights", str(tmp_path / "scorers"))
    assert re.search(r"ratio \d+\.\d+", out)
    diffs = [float(d) for d in re.findall(r"\| (\d\.\d+e[-+]\d+) \|", out)]
    assert len(diffs) == 3 and max(diffs) < 1e-4


def test_feedback_dmd_benchmark_times_both_stages():
    """The GPU measurement of issue 5 (step time, peak memory) runs on CPU with tiny models and prints both rows."""
    import pytest
    pytest.importorskip("mmdet", reason="the feedback step runs SOLO: bash scripts/install_mmdet.sh")
    out = _run("feedback_dmd_step.py", "--steps", "1", "--warmup", "1", "--precision", "32-true")
    rows = [line for line in out.splitlines() if line.startswith(("| feedback", "| DMD"))]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 for r in rows)
