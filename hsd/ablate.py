"""Run experiment configs over seeds; summarise their lab tables as mean ± std per row, and compare every arm with
the first one: the difference of means and whether it exceeds two standard errors."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from .config import load_config
from .errors import MissingFileError
from .io import atomic_path
from .lab.evaluate import COLUMNS, REFERENCE_MODELS
from .train import run

HEADS = {c: h for c, h, _ in COLUMNS}
COMPARED = ["swd", "swd_ode", "mmd", "precision", "recall", "dispersion", "traj_err", "traj_teacher"]
Key = tuple[str, int, str]


def table_rows(table_csv: Path) -> dict[Key, dict[str, float]]:
    """{(model, steps, sampler): metrics} of one run's table.csv, without the teacher and reference rows (equal in
    every run), plus the paper's use of each LoRA: ("LoRA for k steps", k, sampler) = the stage-k LoRA at k steps,
    or the final LoRA at k steps where no stage had k segments (one-stage CTM / CD)."""
    with open(table_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["model"] not in ("Teacher", *REFERENCE_MODELS)]
    out = {(r["model"], int(r["steps"]), r["scheduler"]): {c: float(r[c]) for c, _, _ in COLUMNS if r.get(c)}
           for r in rows}
    for (model, steps, sampler), values in list(out.items()):
        own = model == f"TSCD stage k={steps}"
        final = model == "TSCD final (k=1)" and sampler == "DDIM trailing"
        if own or (final and (f"TSCD stage k={steps}", steps, sampler) not in out):
            out[("LoRA for k steps", steps, sampler)] = values
    return out


def _mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summary(results: dict[str, list[dict[Key, dict[str, float]]]], seeds: list[int]) -> str:
    cols = [c for c, _, _ in COLUMNS]
    lines = [f"Mean ± sample std over seeds {seeds}", "",
             "| Config | Model | Steps | Sampler | " + " | ".join(HEADS[c] for c in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for name, per_seed in results.items():
        for key in per_seed[0]:
            cells = []
            for c in cols:
                v = [r[key][c] for r in per_seed if c in r.get(key, {})]
                cells.append("{:.4f} ± {:.4f}".format(*_mean_std(v)) if v else "")
            lines.append(f"| {name} | {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparisons(results: dict[str, list[dict[Key, dict[str, float]]]]) -> str:
    """Every other arm against the first: mean difference (other − first) ± 2 standard errors of the difference;
    `*` where |difference| > 2 SE (Welch), i.e. it exceeds the seed-to-seed noise."""
    names = list(results)
    if len(names) < 2:
        return ""
    base = names[0]
    lines = [f"Differences against {base} (other − {base}, ± 2 SE; * = exceeds 2 SE)", "",
             "| Arm | Model | Steps | Sampler | " + " | ".join(HEADS[c] for c in COMPARED) + " |",
             "|---|---|---|---|" + "---|" * len(COMPARED)]
    for other in names[1:]:
        for key in results[base][0]:
            if key not in results[other][0]:
                continue
            cells = []
            for c in COMPARED:
                a = [r[key][c] for r in results[base] if c in r.get(key, {})]
                b = [r[key][c] for r in results[other] if c in r.get(key, {})]
                if len(a) < 2 or len(b) < 2:
                    cells.append("")
                    continue
                (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
                se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
                cells.append(f"{mb - ma:+.4f} ± {2 * se:.4f}{' *' if abs(mb - ma) > 2 * se else ''}")
            lines.append(f"| {other} | {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablate(paths: list[str], seeds: list[int], overrides: list[str], out: Path, summary_only: bool = False) -> str:
    """Train (or reuse) every config at every seed as out/<config>_seed<S>, then summarise. `summary_only` reads
    the tables already there (arms run as separate, parallel `hsd ablate` calls into one out folder)."""
    results: dict[str, list[dict]] = {}
    for p in paths:
        name = Path(p).stem
        for seed in seeds:
            cfg = load_config([p], [*overrides, f"seed={seed}", f"name={name}_seed{seed}", f"out_dir={out}"])
            table = out / cfg.name / "table.csv"
            if summary_only and not table.exists():
                raise MissingFileError(f"{table} not found: run `hsd ablate {p} --seeds {seed} --out {out}` first")
            if not summary_only:
                run(cfg)
            results.setdefault(name, []).append(table_rows(table))
    md = summary(results, seeds) + "\n" + comparisons(results)
    with atomic_path(out / "ablation.md") as tmp:
        Path(tmp).write_text(md)
    return md
