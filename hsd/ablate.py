"""Run experiment configs over seeds; summarise their lab tables as mean ± std per row (the reference rows with
their own spread over the per-seed evaluation sets), and compare every arm with the first one, paired by seed:
the mean difference with its confidence interval, p of the paired t-test and q (Benjamini-Hochberg across the
table's cells; hsd.stats). Only what survives the FDR is bold."""
from __future__ import annotations

import csv
import logging
import statistics
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import load_config
from .config.schema import Run
from .errors import MissingFileError
from .io import atomic_path
from .lab.evaluate import COLUMNS, REFERENCE_MODELS, TRAILING
from .stats import Paired, paired, with_q
from .train import run

HEADS = {c: h for c, h, _ in COLUMNS}
COMPARED = ["swd", "swd_ode", "mmd", "precision", "recall", "dispersion", "traj_err", "traj_teacher"]
FDR = 0.05
Key = tuple[str, int, str]
log = logging.getLogger("hsd.ablate")


def is_reference(key: Key) -> bool:
    """The exact rows and the teacher: the same in every arm of one seed (they depend on the evaluation set only)."""
    return key[0] in ("Teacher", *REFERENCE_MODELS)


def compared(key: Key) -> bool:
    """Rows tested against the first arm: not the reference rows, and not the stage rows, which are tested under
    their paper's name ("LoRA for k steps"), so that no cell is counted twice in the FDR."""
    return not is_reference(key) and not key[0].startswith("TSCD stage k=")


def table_rows(table_csv: Path) -> dict[Key, dict[str, float]]:
    """{(model, steps, sampler): metrics} of one run's table.csv, plus the paper's use of each LoRA:
    ("LoRA for k steps", k, sampler) = the stage-k LoRA at k steps, or the final LoRA at k steps where no stage
    had k segments (the one-stage Eq. 7 arm, CD)."""
    with open(table_csv) as f:
        rows = list(csv.DictReader(f))
    out = {(r["model"], int(r["steps"]), r["scheduler"]): {c: float(r[c]) for c, _, _ in COLUMNS if r.get(c)}
           for r in rows}
    for (model, steps, sampler), values in list(out.items()):
        own = model == f"TSCD stage k={steps}"
        final = model == "TSCD final (k=1)" and sampler in TRAILING
        if own or (final and (f"TSCD stage k={steps}", steps, sampler) not in out):
            out[("LoRA for k steps", steps, sampler)] = values
    return out


def _mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summary(results: dict[str, list[dict[Key, dict[str, float]]]], seeds: list[int]) -> str:
    """Mean ± sample std per row; the reference rows once (from the first arm), then each arm's own rows, with its
    teacher rows where they differ from the first arm's (a teacher the arm changes: model.quantize)."""
    cols = [c for c, _, _ in COLUMNS]
    lines = [f"Mean ± sample std over seeds {seeds} (each seed its own evaluation set)", "",
             "| Config | Model | Steps | Sampler | " + " | ".join(HEADS[c] for c in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    first = next(iter(results))
    for name, per_seed in results.items():
        for key in per_seed[0]:
            own = name != first and is_reference(key) and [r.get(key) for r in per_seed] != [
                r.get(key) for r in results[first]]
            if is_reference(key) and name != first and not own:
                continue
            cells = []
            for c in cols:
                v = [r[key][c] for r in per_seed if c in r.get(key, {})]
                cells.append("{:.4f} ± {:.4f}".format(*_mean_std(v)) if v else "")
            label = "reference" if is_reference(key) and not own else name
            lines.append(f"| {label} | {key[0]} | {key[1] or '—'} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_tests(results: dict[str, list[dict[Key, dict[str, float]]]]) -> dict[tuple[str, Key, str], Paired]:
    """Every (other arm, row, metric) against the first arm, paired by seed, with q over all of them."""
    names = list(results)
    base, cells = names[0], {}
    for other in names[1:]:
        for key in results[base][0]:
            if not compared(key) or key not in results[other][0]:
                continue
            for c in COMPARED:
                pairs = [(a[key][c], b[key][c]) for a, b in zip(results[base], results[other])
                         if c in a.get(key, {}) and c in b.get(key, {})]
                if len(pairs) >= 2:
                    cells[(other, key, c)] = paired(*map(list, zip(*pairs)))
    return dict(zip(cells, with_q(list(cells.values()))))


def fmt(t: Paired, alpha: float = FDR) -> str:
    """+0.0123 [-0.0020, +0.0266] p=0.031 q=0.080, bold when q <= alpha."""
    cell = f"{t.mean:+.4f} [{t.low:+.4f}, {t.high:+.4f}] p={t.p:.3f} q={t.q:.3f}"
    return f"**{cell}**" if t.significant(alpha) else cell


def comparisons(results: dict[str, list[dict[Key, dict[str, float]]]], alpha: float = FDR) -> str:
    names = list(results)
    if len(names) < 2:
        return ""
    base, tests = names[0], paired_tests(results)
    n = len(results[base])
    lines = [f"Differences against {base} (other − {base}, paired by seed, n = {n}): mean [95 % CI, t with "
             f"{n - 1} df], p of the paired t-test, q = Benjamini-Hochberg over the {len(tests)} cells of this "
             f"table; **bold** = q ≤ {alpha:g}", "",
             "| Arm | Model | Steps | Sampler | " + " | ".join(HEADS[c] for c in COMPARED) + " |",
             "|---|---|---|---|" + "---|" * len(COMPARED)]
    for other in names[1:]:
        for key in results[base][0]:
            if not compared(key) or key not in results[other][0]:
                continue
            cells = [fmt(tests[(other, key, c)], alpha) if (other, key, c) in tests else "" for c in COMPARED]
            lines.append(f"| {other} | {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def teacher_tests(results: dict[str, list[dict[Key, dict[str, float]]]]) -> dict[tuple[str, Key, str], Paired]:
    """Each arm's LoRA for k steps against the teacher's own k-step trailing sampler (with CFG) of the same seed:
    what distillation bought at equal steps, paired by seed, with q over all of these cells."""
    cells = {}
    for name, per_seed in results.items():
        for key in per_seed[0]:
            teacher = next((t for t in per_seed[0] if t[0] == "Teacher" and t[1] == key[1]
                            and t[2].startswith(f"{key[2]}, CFG")), None)
            if key[0] != "LoRA for k steps" or teacher is None:
                continue
            for c in COMPARED:
                pairs = [(r[teacher][c], r[key][c]) for r in per_seed if c in r.get(teacher, {}) and c in r[key]]
                if len(pairs) >= 2:
                    cells[(name, key, c)] = paired(*map(list, zip(*pairs)))
    return dict(zip(cells, with_q(list(cells.values()))))


def against_teacher(results: dict[str, list[dict[Key, dict[str, float]]]], alpha: float = FDR) -> str:
    tests = teacher_tests(results)
    if not tests:
        return ""
    n = len(next(iter(results.values())))
    lines = [f"Each LoRA at k steps against the teacher's k-step trailing sampler with CFG (LoRA − teacher, paired "
             f"by seed, n = {n}): mean [95 % CI, t with {n - 1} df], p, q = Benjamini-Hochberg over the {len(tests)} "
             f"cells of this table; **bold** = q ≤ {alpha:g}", "",
             "| Arm | Steps | Sampler | " + " | ".join(HEADS[c] for c in COMPARED) + " |",
             "|---|---|---|" + "---|" * len(COMPARED)]
    for (name, key) in dict.fromkeys((name, key) for name, key, _ in tests):
        cells = [fmt(tests[(name, key, c)], alpha) if (name, key, c) in tests else "" for c in COMPARED]
        lines.append(f"| {name} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Keys that change how a run reports or where it is kept, never what it computes: a finished run is reused whatever
# they were (so a committed run folder copied into another sweep's --out is reused there).
PRESENTATION = ("name", "out_dir", "trainer.progress_bar", "trainer.logger")


def same_settings(saved_yaml: str, cfg) -> bool:
    """Whether a run folder's config.yaml describes the run `cfg` would train. The saved file is read onto today's
    schema, so a key added after the run began takes its default (the project's rule: a new key's default is the old
    behaviour) and a committed sweep stays reusable; a key the schema no longer has, or any other value, differs."""
    try:
        saved = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(Run), OmegaConf.create(saved_yaml)))
    except (OmegaConfBaseException, yaml.YAMLError):  # a torn or foreign config.yaml: not this run, train again
        return False
    now = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key in PRESENTATION:
        *section, leaf = key.split(".")
        for tree in (saved, now):
            (tree[section[0]] if section else tree).pop(leaf, None)
    return saved == now


def finished(folder: Path, cfg) -> bool:
    """A run folder whose table is written under this config (its config.yaml, saved when the run began; see
    same_settings): reused as it is, without loading a model, so a sweep spans sessions by keeping (or committing)
    these two files."""
    saved = folder / "config.yaml"
    done = (folder / "table.csv").exists() and saved.exists() and same_settings(saved.read_text(), cfg)
    if done:
        log.info("reusing the finished run %s", folder)
    return done


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
            if not summary_only and not finished(out / cfg.name, cfg):
                run(cfg)
            results.setdefault(name, []).append(table_rows(table))
    md = summary(results, seeds) + "\n" + comparisons(results) + "\n" + against_teacher(results)
    with atomic_path(out / "ablation.md") as tmp:
        Path(tmp).write_text(md)
    return md
