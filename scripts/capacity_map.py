"""The capacity map of issue 22: metric against LoRA rank, one panel per step count, for TSCD, the one-stage
Eq. 7 arm and CD at equal iterations (scripts/capacity_sweep.sh). Each arm is read as the paper uses it ("LoRA for k
steps": the stage-k LoRA at k steps, the final LoRA where no stage had k segments; DDIM trailing). Prints mean ± std
over the seeds found per cell and, where a cell has 2+ paired seeds, TSCD − arm paired by seed with q
(Benjamini-Hochberg over the map's cells, hsd.stats); writes docs/capacity.png.
    .venv/bin/python scripts/capacity_map.py [--metric traj_teacher] [--out docs/capacity.png]"""
import argparse
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hsd.ablate import table_rows  # noqa: E402
from hsd.stats import with_q, paired  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("tscd", "one_stage", "cd")
STEPS = (1, 2, 4, 8)


def collect(root: Path, metric: str) -> dict[tuple[str, int, int], dict[int, float]]:
    """{(arm, rank, steps): {seed: value}} from root/r<R>/<arm>_seed<S>/table.csv."""
    out: dict = {}
    for table in sorted(root.glob("r*/*_seed*/table.csv")):
        rank = int(table.parts[-3][1:])
        arm, seed = re.fullmatch(r"(.+)_seed(\d+)", table.parent.name).groups()
        rows = table_rows(table)
        for k in STEPS:
            row = rows.get(("LoRA for k steps", k, "DDIM trailing"))
            if row and metric in row:
                out.setdefault((arm, rank, k), {})[int(seed)] = row[metric]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(ROOT / "experiments/capacity"))
    ap.add_argument("--metric", default="traj_teacher")
    ap.add_argument("--out", default=str(ROOT / "docs/capacity.png"))
    a = ap.parse_args()
    cells = collect(Path(a.root), a.metric)
    ranks = sorted({r for _, r, _ in cells})
    print(f"{a.metric}, 'LoRA for k steps' (DDIM trailing), mean ± std over the seeds found (n)")
    print("| rank | steps | " + " | ".join(ARMS) + " |\n|---|---|" + "---|" * len(ARMS))
    for r in ranks:
        for k in STEPS:
            vals = []
            for arm in ARMS:
                v = list(cells.get((arm, r, k), {}).values())
                sd = f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else ""
                vals.append(f"{statistics.mean(v):.4f}{sd} (n={len(v)})" if v else "not run")
            print(f"| {r} | {k} | " + " | ".join(vals) + " |")
    tests = {}
    for (arm, r, k), by_seed in cells.items():
        base = cells.get(("tscd", r, k), {})
        common = sorted(set(base) & set(by_seed))
        if arm != "tscd" and len(common) >= 2:
            tests[(arm, r, k)] = paired([base[s] for s in common], [by_seed[s] for s in common])
    if tests:
        print("\nTSCD vs arm, paired by seed (arm − TSCD), q over the map's cells:")
        for key, t in zip(tests, with_q(list(tests.values()))):
            print(key, t)
    else:
        print("\nNo cell has 2 paired seeds yet: no test (a single seed is a look, not a claim).")
    fig, axes = plt.subplots(1, len(STEPS), figsize=(4 * len(STEPS), 3.2), sharey=False)
    for ax, k in zip(axes, STEPS):
        for arm in ARMS:
            xs = [r for r in ranks if (arm, r, k) in cells]
            ys = [statistics.mean(cells[(arm, r, k)].values()) for r in xs]
            es = [statistics.stdev(cells[(arm, r, k)].values()) if len(cells[(arm, r, k)]) > 1 else 0 for r in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=arm)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{k} step{'s' * (k > 1)}")
        ax.set_xlabel("LoRA rank")
    axes[0].set_ylabel(a.metric)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
