"""Writes notebooks/feedback_dmd_lab.ipynb (unexecuted; tests/test_notebooks.py runs it top to bottom)."""
from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("""# Feedback learning and DMD in the lab world

Hyper-SD's stages after TSCD (§3.2, §3.3) on the analytic lab world, where every metric is exact:

1. **Feedback** (ReFL-style, Eq. 15): x_T is denoised without gradient to a random step of the student's
   schedule, one step with gradient predicts x'_0, and the hinge ReLU(α − r(x'_0, c)) pulls every sample
   whose reward is below the margin α. The lab's reward is exact: log p_data(x | prompt's class) per
   dimension. The feedback LoRA is trained on top of the frozen TSCD LoRA and merged at weights (1, w).
2. **DMD** (Eq. 10): the 1-step generator's samples are noised; the frozen teacher with CFG (real score) and a
   fake score network fitted to the generator's samples predict x0; their normalised difference is the
   generator's gradient. The lab's recipe trains the TSCD LoRA on this way as a one-step generator at timestep
   800 (sampled with LCM at t = 800, like the released one-step UNet); at timestep 999 it is the *unified LoRA*.

A short run takes a few minutes; `hsd train experiments/lab/hypersd.yaml` runs the measured one, and
`hsd ablate experiments/lab/hypersd.yaml --seeds 0 1 2` its seeds (docs/lab.md has the numbers)."""),
    code("""import csv, tempfile
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from IPython.display import Image, Markdown, display
from hsd.config import load_config
from hsd.losses.feedback import reward_hinge
from hsd.train import run
torch.set_num_threads(2)"""),
    md("""## The hinge (Eq. 15)
Zero above the margin, so samples that already score well stop pulling, and linear below it."""),
    code("""r = torch.linspace(-3, 3, 61)
loss = torch.stack([reward_hinge({"lab": v[None]}, {"lab": 1.3}) for v in r])
plt.figure(figsize=(4, 2.5)); plt.plot(r, loss); plt.axvline(1.3, ls="--", c="grey")
plt.xlabel("reward r (nats/dim)"); plt.ylabel("ReLU(1.3 - r)"); plt.show()"""),
    md("""## A short run: TSCD (k = 1 only), the feedback LoRA, DMD
The TSCD stage is cut to one short k = 1 stage so the notebook stays quick; the rows below are the teacher, the
TSCD LoRA, its merges with the feedback LoRA at weights (1, w), the TSCD LoRA sampled at t = 800 and the one-step
LoRA after DMD. The last column is the feedback reward."""),
    code("""out = Path(tempfile.mkdtemp())
cfg = load_config(["../experiments/lab/hypersd.yaml"], [
    f"out_dir={out}", "name=notebook", "lab.eval_per_class=16", "lab.student_steps=[1, 2]",
    "trainer.progress_bar=false", "tscd.batch_size=16", "tscd.stages=[{k: 1, iterations: 30}]",
    "feedback.iterations=20", "feedback.batch_size=16", "feedback.merge_weights=[0.0, 0.5, 1.0]",
    "dmd.iterations=20", "dmd.batch_size=8", "dmd.fake_updates=2"])
display(Markdown(run(cfg)))"""),
    md("""## The merge sweep
`hsd lora merge lora_stage0_k1.safetensors lora_feedback.safetensors:w` writes the same merged LoRA the table
fuses; here the reward and fidelity of each weight w, at 1 and 4 steps."""),
    code("""rows = list(csv.DictReader(open(out / "notebook" / "table.csv")))
merged = [r for r in rows if r["model"].startswith("TSCD + feedback")]
fig, ax = plt.subplots(1, 2, figsize=(8, 2.8))
for steps in ("1", "4"):
    pts = [(float(r["model"].split(", ")[-1].rstrip(")")), float(r["reward"]), float(r["fidelity"]))
           for r in merged if r["steps"] == steps]
    ax[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{steps} step(s)")
    ax[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"{steps} step(s)")
ax[0].set_title("reward"); ax[1].set_title("fidelity")
for a in ax:
    a.set_xlabel("feedback weight w"); a.legend()
plt.show()"""),
    md("""## Samples
One row per table row (two samples of each class), from the same noise."""),
    code("""display(Image(filename=str(out / "notebook" / "samples.png")))"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
path = Path(__file__).resolve().parent.parent / "notebooks" / "feedback_dmd_lab.ipynb"
nbf.write(nb, path)
print(path)
