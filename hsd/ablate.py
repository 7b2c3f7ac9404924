"""Run experiment configs over seeds and compare their final (k = 1) students at 1, 2 and 4 steps."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path

from .config import load_config
from .train import run

METRICS = [("fidelity", "Fidelity ↑"), ("traj_err", "Traj. error ↓"), ("alignment", "Alignment ↑")]


def final_rows(table_csv: Path, steps: tuple[int, ...]) -> dict[int, dict[str, float]]:
    with open(table_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["model"].startswith("TSCD final")]
    return {int(r["steps"]): {m: float(r[m]) for m, _ in METRICS} for r in rows if int(r["steps"]) in steps}


def ablate(paths: list[str], seeds: list[int], overrides: list[str], out: Path,
           steps: tuple[int, ...] = (1, 2, 4)) -> str:
    results: dict[str, list[dict]] = {}
    for p in paths:
        name = Path(p).stem
        for seed in seeds:
            cfg = load_config([p], [*overrides, f"seed={seed}", f"name={name}_seed{seed}", f"out_dir={out}"])
            run(cfg)
            results.setdefault(name, []).append(final_rows(out / cfg.name / "table.csv", steps))
    lines = [f"Final k=1 student, mean ± std over seeds {seeds}", "",
             "| Config | Steps | " + " | ".join(h for _, h in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, per_seed in results.items():
        for n in steps:
            cells = []
            for m, _ in METRICS:
                v = [r[n][m] for r in per_seed]
                cells.append(f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}")
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(md)
    return md
