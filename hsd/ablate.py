"""Run experiment configs over seeds and summarise every row of their lab tables: mean ± std per (model, steps)."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path

from .config import load_config
from .train import run

METRICS = [("alignment", "Alignment ↑"), ("fidelity", "Fidelity ↑"), ("traj_err", "Traj. error ↓"),
           ("coverage", "Coverage ↑"), ("reward", "Reward ↑")]


def table_rows(table_csv: Path, skip_teacher: bool = True) -> dict[tuple[str, int, str], dict[str, float]]:
    """{(model, steps, scheduler): metrics} of one run's table.csv (the teacher rows, equal in every run, left out)."""
    with open(table_csv) as f:
        rows = [r for r in csv.DictReader(f) if not (skip_teacher and r["model"] == "Teacher")]
    return {(r["model"], int(r["steps"]), r["scheduler"]): {m: float(r[m]) for m, _ in METRICS if m in r}
            for r in rows}


def ablate(paths: list[str], seeds: list[int], overrides: list[str], out: Path) -> str:
    results: dict[str, list[dict]] = {}
    for p in paths:
        name = Path(p).stem
        for seed in seeds:
            cfg = load_config([p], [*overrides, f"seed={seed}", f"name={name}_seed{seed}", f"out_dir={out}"])
            run(cfg)
            results.setdefault(name, []).append(table_rows(out / cfg.name / "table.csv"))
    lines = [f"Mean ± population std over seeds {seeds}", "",
             "| Config | Model | Steps | Scheduler | " + " | ".join(h for _, h in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for name, per_seed in results.items():
        for key in per_seed[0]:
            cells = []
            for m, _ in METRICS:
                v = [r[key][m] for r in per_seed if m in r.get(key, {})]
                cells.append(f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" if v else "")
            lines.append(f"| {name} | {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(md)
    return md
