import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HSD = [sys.executable, "-m", "hsd.cli"]


def test_lab_teacher_then_lab_end_to_end(tmp_path):
    """`hsd lab-teacher` (tiny) makes a loadable teacher; `hsd lab` trains 8->4->2->1, the feedback LoRA and DMD on
    it and writes the table."""
    teacher = tmp_path / "teacher"
    r = subprocess.run([*HSD, "lab-teacher", "--steps", "20", "--batch", "16", "--out", str(teacher)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    args = [*HSD, "lab", f"lab.teacher={teacher}", f"out_dir={tmp_path}", "name=e2e", "lab.eval_per_class=8",
            "tscd.batch_size=8", "trainer.progress_bar=false",
            "tscd.stages=[{k: 8, iterations: 2}, {k: 4, iterations: 2}, {k: 2, iterations: 2}, {k: 1, iterations: 3}]",
            "feedback.iterations=2", "feedback.batch_size=8", "feedback.merge_weights=[0.0, 1.0]",
            "dmd.iterations=2", "dmd.batch_size=8"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "e2e"
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [(x["model"], int(x["steps"])) for x in rows] == (  # the paper's protocol (docs/lab.md)
        [("Data (exact samples)", 0), ("Exact ODE (other noise)", 0)] + [("Teacher", n) for n in (1, 2, 4, 8, 25)]
        + [(f"TSCD stage k={k}", k) for k in (8, 4, 2, 1)] + [("TSCD final (k=1)", n) for n in (2, 4, 8, 1, 2, 4, 8)]
        + [(f"TSCD + feedback, weights (1, {w})", n) for w in (0, 1) for n in (1, 4)]
        + [("TSCD final (k=1)", 1), ("DMD one-step LoRA (t=800)", 1)])
    by = {(x["model"], int(x["steps"]), x["scheduler"]): x for x in rows}
    # the feedback LoRA at weight 0 is the TSCD LoRA (fused into the weights here, an adapter there)
    tcd = f"TCD eta={0.3}"
    assert abs(float(by[("TSCD + feedback, weights (1, 0)", 1, tcd)]["loglik"])
               - float(by[("TSCD final (k=1)", 1, tcd)]["loglik"])) < 1e-3
    assert all(0 <= float(x["alignment"]) <= 1 and 0 <= float(x["precision"]) <= 1 and float(x["swd"]) > 0
               for x in rows)
    assert all(float(x["traj_err"]) >= 0 for x in rows if int(x["steps"]))  # reference rows: other noise, none
    assert (out / "table.md").read_text().count("\n| ") == len(rows) + 1
    assert (out / "samples.png").stat().st_size > 0 and (out / "metrics.png").stat().st_size > 0
    assert (out / "config.yaml").exists()
    assert len(list(out.glob("lora_stage*_k?.safetensors"))) == 4  # diffusers layout
    assert len(list(out.glob("lora_stage*_k?.kohya.safetensors"))) == 4
    assert (out / "lora_feedback.kohya.safetensors").exists() and (out / "lora_onestep_t800.safetensors").exists()
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    # A rerun finds every stage's LoRA and only rebuilds the table.
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "Trainer.fit" not in r.stderr + r.stdout
    assert list(csv.DictReader(open(out / "table.csv"))) == rows
