"""Writes notebooks/tscd_lab.ipynb and notebooks/feedback_dmd_lab.ipynb, executed, with their outputs (plots,
tables, sample grids), so that they read on a repository page without running.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/make_lab_notebooks.py            # both, on the digits world
    .venv/bin/python scripts/make_lab_notebooks.py --world blocks tscd         # one, on the smoke world
    .venv/bin/python scripts/make_lab_notebooks.py --no-execute                # unexecuted

tests/test_notebooks.py executes them again, in memory. Timing metadata is left out so that a rerun changes
only what the computation changed.
"""
import argparse
import time
from pathlib import Path

import nbformat as nbf
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

# Shared by both notebooks: the world's teacher and an image grid that shows 1-channel worlds in grey and
# 3-channel worlds in colour.
SETUP = """import csv, logging, tempfile, warnings
from pathlib import Path
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bars: the run has none
import matplotlib.pyplot as plt
import torch
from IPython.display import Image, Markdown, display

from hsd.config import load_config
from hsd.lab.teacher import load_teacher, teacher_path
from hsd.train import run

WORLD = "{world}"  # the default lab world; "blocks" is the fast 3-channel smoke world
torch.set_num_threads(2)
torch.manual_seed(0)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no "GPU available" banners in the outputs
teacher = load_teacher(teacher_path(WORLD))
world = teacher.world  # the exact world the teacher was fitted to


def to_image(x):
    \"\"\"One sample [ch, S, S] in [-1, 1] as imshow takes it: [S, S] (grey) or [S, S, 3] (colour).\"\"\"
    x = x.detach().float().clamp(-1, 1) * 0.5 + 0.5
    return x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)


def show(rows, size=0.7):
    \"\"\"A grid with one row per entry of {{name: samples [B, ch, S, S]}}, the name above its row.\"\"\"
    n = max(len(x) for x in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n, (size + 0.25) * len(rows)), squeeze=False)
    for r, (name, x) in enumerate(rows.items()):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(x):
                ax.imshow(to_image(x[c]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[r, 0].set_title(name, fontsize=9, loc="left")
    plt.show()


print(f"world {{world.name!r}}: {{world.n_classes}} classes x {{world.n_modes}} modes of shape "
      f"{{'x'.join(map(str, world.shape))}}, sigma {{world.sigma:g}}; prompts {{world.prompts[0]!r}} ...")"""

TSCD = [
    md("""# TSCD in the lab world

Hyper-SD's Trajectory Segmented Consistency Distillation (§3.1) on hsd's analytic lab world. The default world,
`digits`, is built from the 8x8 handwritten digits that ship inside scikit-learn: ten classes (prompts such as
"the digit three"), each summarised by 16 k-means centroids, and every centroid is the mean of an isotropic
Gaussian mode (sigma 0.25) in [-1, 1]^(1x8x8). The noised marginals of a Gaussian mixture are Gaussian mixtures,
so the score, the probability-flow ODE and the data likelihood have closed forms: every metric below is either
exact or an estimate against exact samples. The teacher is a small diffusers UNet fitted to the exact score
(`hsd lab-teacher`), loaded the way an SD1.5 folder is.

The notebook shows (1) the world, (2) how much room few-step sampling leaves even with the exact score,
(3) why the table's distributional metrics are needed, (4) how TSCD cuts the trajectory into k segments,
(5) what few-step DDIM does to the teacher's trajectories, and (6) the table, metric plot and samples of a
short run. It runs in a few minutes on two CPU cores. `hsd lab` runs the full experiment; the measured
full-budget numbers are in docs/lab.md."""),
    code(SETUP),
    md("""## 1. The world
Each row is one prompt's modes (the k-means centroids, the likeliest points of the data), then exact samples:
a centroid plus Gaussian noise of sigma 0.25 per pixel."""),
    code("""show({p: world.means[c] for c, p in enumerate(world.prompts)})
g = torch.Generator().manual_seed(0)
show({"exact samples, two per prompt": world.sample(torch.arange(world.n_classes).repeat_interleave(2), g)})"""),
    md("""## 2. Headroom: few-step DDIM with the exact score
Distillation has something to do only where few-step sampling is clearly wrong. `headroom` runs DDIM (trailing
spacing, CFG 3) with the *exact* guided score and measures the mean squared error per dimension to the exact
ODE endpoint from the same noise: with no network error left, this is the sampler's own error. `hsd lab-worlds`
prints the same numbers for every named world."""),
    code("""from hsd.lab.headroom import headroom
err = headroom(world)
fig, ax = plt.subplots(figsize=(4.5, 3))
ax.loglog(list(err), list(err.values()), "o-")
ax.set_xticks(list(err), [str(n) for n in err]); ax.minorticks_off()
ax.set_xlabel("DDIM steps (exact score)"); ax.set_ylabel("MSE to the exact ODE endpoint")
ax.set_title(f"headroom of the {world.name} world"); plt.show()
display(Markdown("| Steps | " + " | ".join(map(str, err)) + " |\\n|---|" + "---|" * len(err) + "\\n| MSE / dim | "
                 + " | ".join(f"{v:.4f}" for v in err.values()) + f" |\\n\\n4 steps / 25 steps: "
                 f"{err[4] / err[25]:.1f}x; 8 / 25: {err[8] / err[25]:.1f}x"))"""),
    md("""## 3. Why the table has distributional metrics
The log-likelihood of samples under the data (`loglik`, nats per dimension) is *maximised by collapse*: a
mode's centre is its likeliest point, so a sampler that returns centroids beats exact data on it. The table
therefore sets every model against exact samples of the same prompts: sliced Wasserstein-2 (SWD) and MMD² to
exact data, typical-set precision (the share of samples whose log p(x | class) lies where exact data's does),
3-NN recall (the share of exact data near some sample) and dispersion (mean squared distance to the nearest
centroid over its value for exact data: 1 is right, 0 is collapse). Four hand-made sample sets with the same
labels: exact data, collapse onto centroids, a blur (each class's average centroid: nearly E[x0 | x_T] for pure
noise x_T, where an unguided one-step prediction lands) and a set twice as spread out as the data."""),
    code("""from hsd.lab.metrics import Truth, metrics
labels = torch.arange(world.n_classes).repeat_interleave(32)
g = torch.Generator().manual_seed(1)
modes = torch.randint(world.n_modes, labels.shape, generator=g)
noise = torch.randn(len(labels), *world.shape, generator=g, dtype=torch.float64)
sets = {"Exact data": world.sample(labels, g),
        "Collapse (centroids)": world.means[labels, modes],
        "Blur (class average)": world.means[labels].mean(1),
        "Too wide (2 sigma)": world.means[labels, modes] + 2 * world.sigma * noise}
truth = Truth.measure(world, labels)
cols = [("loglik", "Log-lik ↑*", "{:.2f}"), ("precision", "Prec ↑", "{:.3f}"), ("recall", "Recall ↑", "{:.3f}"),
        ("dispersion", "Disp →1", "{:.2f}"), ("swd", "SWD ↓", "{:.3f}"), ("mmd", "MMD² ↓", "{:.4f}"),
        ("alignment", "Align ↑", "{:.3f}"), ("coverage", "Cover ↑", "{:.3f}")]
table = ["| Samples | " + " | ".join(h for _, h, _ in cols) + " |", "|---|" + "---|" * len(cols)]
for name, x in sets.items():
    m = metrics(world, x, labels, truth)
    table.append(f"| {name} | " + " | ".join(f.format(m[c]) for c, _, f in cols) + " |")
display(Markdown("\\n".join(table)))
show({name: x[::32] for name, x in sets.items()})"""),
    md("""Collapse scores a higher log-likelihood than exact data, and so does the blur; the distributional columns
expose both. Collapse has no sample in the typical set and dispersion 0 (recall alone would not catch it here:
the centroids are close to one another, so the balls around neighbouring centroids still reach much of the
data). The blur reaches few modes (coverage), recalls none of the data and sits far from it in SWD and MMD².
The wide set falls out of the typical set the other way (dispersion above 1) and loses log-likelihood. Exact
data's own SWD is not 0 and its MMD² only near 0: they are finite-sample estimates, which is why the run's table
carries exact reference rows, each estimate's floor."""),
    md("""## 4. Segments (Algorithm 1, Eq. 13)
For each k: t_n is drawn from the teacher's N = 32-step DDIM grid, t_b = floor(t_n / ceil(T/k)) * ceil(T/k) is its
segment start, and t_end ~ U[t_b, t_prev]. Every point lies under the diagonal and above its segment's floor;
k = 1 is one-stage CTM (t_end anywhere in [0, t_prev])."""),
    code("""from hsd.diffusion.segments import ddim_grid, sample_times
grid = ddim_grid(1000, 32)
fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), sharey=True)
for ax, k in zip(axes, (8, 4, 2, 1)):
    s = sample_times(grid, k, 1000, 3000, torch.Generator().manual_seed(k))
    ax.scatter(s.t_n, s.t_end, s=2, alpha=0.3)
    for b in range(0, 1000, -(-1000 // k)):
        ax.axhline(b, color="grey", lw=0.5)
    ax.plot([0, 1000], [0, 1000], "k--", lw=0.5)
    ax.set_title(f"k = {k}"); ax.set_xlabel("t_n")
    assert ((s.t_end >= s.t_b) & (s.t_end < s.t_n)).all()
axes[0].set_ylabel("t_end"); plt.show()"""),
    md("""## 5. Trajectories: the exact ODE vs the teacher's few-step DDIM
From the same noise (16 per prompt), the exact guided ODE endpoint (CFG 3) and the fitted teacher's DDIM
samples at 1, 2, 4, 8 and 25 steps; the grid shows the first sample of each prompt. The trajectory error is
the MSE per dimension to the exact endpoint. One step lands on an average of the class's modes with its contrast
blown up by the guidance, far from every mode: the failure TSCD repairs. The 25-step row is the fitted teacher's
floor, and it is not exact data either: where its dispersion and precision fall below the exact ODE's, the
fitted teacher is narrower than the data, and a student distilled from it inherits that."""),
    code("""from diffusers import DDIMScheduler
from hsd.lab.evaluate import sample
from hsd.lab.ode import exact_ode
per = 16
labels = torch.arange(world.n_classes).repeat_interleave(per)
x_T = torch.randn(len(labels), *world.shape, generator=torch.Generator().manual_seed(3))
emb = teacher.encode(world.prompts + [""])
cond, uncond = emb[labels], emb[-1:].expand(len(labels), -1, -1)
ref = exact_ode(world, x_T, labels, 3.0, float(teacher.scheduler.alphas_cumprod[-1]), steps=100).float()
rows = {"exact ODE": ref}
for n in (1, 2, 4, 8, 25):
    sch = DDIMScheduler.from_config(teacher.scheduler.config)  # trailing spacing, final alpha-bar 1
    rows[f"teacher DDIM, {n} step{'s' * (n > 1)}"] = sample(teacher.unet, sch, x_T, cond, uncond, 3.0, n)
show({name: x[::per] for name, x in rows.items()})
truth = Truth.measure(world, labels)
cols = [("traj_err", "Traj ODE ↓", "{:.4f}"), ("dispersion", "Disp →1", "{:.2f}"), ("precision", "Prec ↑", "{:.3f}"),
        ("swd", "SWD ↓", "{:.3f}"), ("alignment", "Align ↑", "{:.3f}")]
table = ["| Samples | " + " | ".join(h for _, h, _ in cols) + " |", "|---|" + "---|" * len(cols)]
for name, x in rows.items():
    m = metrics(world, x, labels, truth, {"traj_err": ref})
    table.append(f"| {name} | " + " | ".join(f.format(m[c]) for c, _, f in cols) + " |")
display(Markdown("\\n".join(table)))"""),
    md("""## 6. A short run: the table, the metric plot, the samples
Four TSCD stages (k = 8, 4, 2, 1) of 15 iterations each at batch 32, where `hsd lab` trains 1000 iterations at
batch 64; 16 evaluation samples per prompt. The table follows the paper's protocol: the two exact reference rows
(each estimated metric's floor), the teacher (CFG 3, DDIM trailing) at 1, 2, 4, 8 and 25 steps, each stage's
LoRA at its own k steps, and the final k = 1 LoRA at 1 to 8 steps with DDIM and with TCD."""),
    code("""out = Path(tempfile.mkdtemp())
cfg = load_config(["../experiments/lab/tscd.yaml"], [
    f"out_dir={out}", "name=notebook", f"lab.world={WORLD}", "lab.eval_per_class=16", "trainer.progress_bar=false",
    "tscd.batch_size=32",
    "tscd.stages=[{k: 8, iterations: 15}, {k: 4, iterations: 15}, {k: 2, iterations: 15}, {k: 1, iterations: 15}]"])
display(Markdown(run(cfg)))"""),
    md("""Each metric against the number of steps (dashed and dotted: the two exact reference rows):"""),
    code("""display(Image(filename=str(out / "notebook" / "metrics.png")))"""),
    md("""One row of samples per table row (the first sample of each prompt, from the same noise):"""),
    code("""display(Image(filename=str(out / "notebook" / "samples.png")))"""),
    md("""## What the short run shows
With 60 iterations in all (15 per stage) the LoRAs are far from trained: the run shows the
stages, the rows and the metrics, not the result. Read each row against the reference rows at the top: the
teacher's own few-step rows show section 2's headroom as distances to exact data, and the student rows show how
far this little training moves the few-step samples; the 1-step rows in particular are still far from the data
on SWD and MMD². The full-budget run (`hsd lab`) and its seeds are measured in docs/lab.md."""),
]

FEEDBACK_DMD = [
    md("""# Feedback learning and DMD in the lab world

Hyper-SD's stages after TSCD (§3.2, §3.3) on the analytic lab world (the default `digits` world: ten digit
classes, 16 Gaussian modes each, 1x8x8; see notebooks/tscd_lab.ipynb), where every metric is exact or measured
against exact samples:

1. **Feedback** (ReFL-style, Eq. 15): x_T is denoised without gradient to a random step of the student's
   schedule, one step with gradient predicts x'_0, and the hinge ReLU(α − r(x'_0, c)) pulls every sample
   whose reward is below the margin α. The lab's reward is exact: log p_data(x | prompt's class) per
   dimension. The feedback LoRA is trained on top of the frozen TSCD LoRA and merged at weights (1, w).
2. **DMD** (Eq. 10): the 1-step generator's samples are noised; the frozen teacher (real score) and a fake
   score network fitted to the generator's samples predict x0; their normalised difference is the generator's
   gradient. The lab's recipe trains the TSCD LoRA on this way as a one-step generator at timestep 800
   (sampled with LCM at t = 800, like the released one-step UNet); at timestep 999 it is the *unified LoRA*.

The run below is short (a few minutes on two CPU cores) and shows the mechanics, not the measured result:
`hsd train experiments/lab/hypersd.yaml` runs the full budget and `hsd ablate experiments/lab/hypersd.yaml
--seeds 0 1 2` its seeds; the measured numbers are in docs/lab.md."""),
    code(SETUP),
    md("""## The reward and the hinge (Eq. 15)
The hinge is zero above the margin, so samples that already score well stop pulling, and linear below it.
The reward is a log-likelihood, so it has the same caveat as the table's log-likelihood column: it is
highest at a mode's centre. The vertical lines mark the mean reward of exact data and of the centroids
themselves (about the most a sample can score); on the right, the rewards of single exact samples. Where the
configured margin α lies against them decides what the hinge does: above the data's rewards it keeps pulling
samples that are already typical towards their mode centres, above the centroids' reward it never switches
off. The table's dispersion and precision columns show whether that costs diversity."""),
    code("""from hsd.losses.feedback import reward_hinge
cfg = load_config(["../experiments/lab/hypersd.yaml"])
margin = cfg.feedback.rewards["lab"].margin
labels = torch.arange(world.n_classes).repeat_interleave(256)
g = torch.Generator().manual_seed(0)
data = world.sample(labels, g)
centres = world.means[labels, torch.randint(world.n_modes, labels.shape, generator=g)]
r_data = world.class_log_prob(data, labels) / world.dim  # per sample
r_centre = (world.class_log_prob(centres, labels) / world.dim).mean().item()
r = torch.linspace(min(r_data.quantile(0.01).item(), margin) - 1, max(r_centre, margin) + 0.5, 101)
loss = torch.stack([reward_hinge({"lab": v[None]}, {"lab": margin}) for v in r])
fig, (ax, hist) = plt.subplots(1, 2, figsize=(10, 3), sharex=True)
ax.plot(r, loss, label=f"ReLU({margin:g} - r)")
for a in (ax, hist):
    a.axvline(r_data.mean(), ls="--", c="C1", label=f"exact data, mean: {r_data.mean():.2f}")
    a.axvline(r_centre, ls=":", c="C2", label=f"centroids: {r_centre:.2f}")
    a.set_xlabel("reward r = log p(x | class) / dim (nats)")
hist.hist(r_data, bins=60, range=(r[0].item(), r[-1].item()), color="C1", alpha=0.5)
hist.axvline(margin, c="C0", label=f"margin {margin:g}")
below = (r_data < margin).double().mean().item()
hist.set_title(f"exact data's rewards: {below:.0%} below the margin", fontsize=10)
ax.set_ylabel("hinge loss"); ax.legend(fontsize=8); hist.legend(fontsize=8); fig.tight_layout(); plt.show()
where = ("above the centroids' reward: it never switches off" if margin > r_centre else
         "above the data's mean reward: it pulls many typical samples towards their centres"
         if margin > r_data.mean() else "at or below the data's mean reward: most typical samples stop pulling")
print(f"margin {margin:g} (experiments/lab/hypersd.yaml) is {where}")"""),
    md("""## A short run: TSCD (k = 1 only), the feedback LoRA, DMD
The TSCD stage is cut to one k = 1 stage of 30 iterations, feedback and DMD to 20 iterations each, and the
evaluation to 16 samples per prompt, so that the notebook stays quick. The rows: the exact references, the
teacher, the TSCD LoRA, its merges with the feedback LoRA at weights (1, w) (TCD, 1 and 4 steps), the TSCD LoRA
sampled at t = 800 without DMD, and the one-step LoRA after DMD."""),
    code("""out = Path(tempfile.mkdtemp())
cfg = load_config(["../experiments/lab/hypersd.yaml"], [
    f"out_dir={out}", "name=notebook", f"lab.world={WORLD}", "lab.eval_per_class=16", "lab.student_steps=[1, 2]",
    "trainer.progress_bar=false", "tscd.batch_size=16", "tscd.stages=[{k: 1, iterations: 30}]",
    "feedback.iterations=20", "feedback.batch_size=16", "feedback.merge_weights=[0.0, 0.5, 1.0]",
    "dmd.iterations=20", "dmd.batch_size=8", "dmd.fake_updates=2"])
display(Markdown(run(cfg)))"""),
    md("""## The merge sweep
`hsd lora merge lora_stage0_k1.safetensors lora_feedback.safetensors:w` writes the same merged LoRA the table
fuses. Here each weight w at 1 and 4 steps: the reward the feedback stage trained on, and beside it what the
reward cannot see (dispersion, precision, SWD to exact data)."""),
    code("""%matplotlib inline
# (the run's metric plot switched matplotlib to its file backend; this switches the notebook's back)
rows = list(csv.DictReader(open(out / "notebook" / "table.csv")))
merged = [r for r in rows if r["model"].startswith("TSCD + feedback")]
panels = [("reward", "reward ↑"), ("dispersion", "dispersion →1"), ("precision", "precision ↑"), ("swd", "SWD ↓")]
fig, axes = plt.subplots(1, len(panels), figsize=(14, 2.8))
for steps in ("1", "4"):
    pts = [r for r in merged if r["steps"] == steps]
    w = [float(r["model"].split(", ")[-1].rstrip(")")) for r in pts]
    for ax, (col, title) in zip(axes, panels):
        ax.plot(w, [float(r[col]) for r in pts], "o-", label=f"{steps} step(s)")
        ax.set_title(title); ax.set_xlabel("feedback weight w")
axes[1].axhline(1, ls="--", c="k", lw=1)  # exact data's dispersion
axes[0].legend(); fig.tight_layout(); plt.show()"""),
    md("""## The metric plot and the samples
Each metric against the number of steps (dashed and dotted: the exact reference rows), then one row of samples
per table row (the first sample of each prompt, from the same noise)."""),
    code("""display(Image(filename=str(out / "notebook" / "metrics.png")))"""),
    code("""display(Image(filename=str(out / "notebook" / "samples.png")))"""),
    md("""## What the short run shows
With 20 iterations of feedback and of DMD the LoRAs have barely moved: the run shows the
stages, the merged rows and the same-timestep baseline for DMD, not the result. The full-budget run and its
seeds are measured in docs/lab.md."""),
]

SPECS = {"tscd": ("tscd_lab.ipynb", TSCD), "feedback_dmd": ("feedback_dmd_lab.ipynb", FEEDBACK_DMD)}


def build(cells: list, world: str) -> nbf.NotebookNode:
    out = []
    for cell in cells:
        cell = nbf.from_dict(cell)  # a copy: the cell lists are shared module state
        if cell.source == SETUP:
            cell.source = SETUP.format(world=world)
        out.append(cell)
    nb = nbf.v4.new_notebook(cells=out, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                  "language": "python"}})
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: a rerun does not rewrite every cell's random id
    return nb


def execute(nb: nbf.NotebookNode) -> float:
    start = time.perf_counter()
    NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    if errors:
        raise RuntimeError("\n".join(f"{e.ename}: {e.evalue}" for e in errors))
    nb.metadata.pop("widgets", None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", help=f"notebooks to write, of {', '.join(SPECS)} (default: both)")
    parser.add_argument("--world", default="digits", help="lab world the notebooks load (default: digits)")
    parser.add_argument("--no-execute", action="store_true", help="write them without outputs")
    args = parser.parse_args()
    unknown = set(args.which) - set(SPECS)
    if unknown:
        parser.error(f"unknown notebook(s) {sorted(unknown)}; known: {', '.join(SPECS)}")
    for key in args.which or list(SPECS):
        name, cells = SPECS[key]
        nb = build(cells, args.world)
        if not args.no_execute:
            print(f"{name}: executed in {execute(nb):.0f} s", flush=True)
        nbf.validate(nb)
        nbf.write(nb, NOTEBOOKS / name)
        print(NOTEBOOKS / name)


if __name__ == "__main__":
    main()
