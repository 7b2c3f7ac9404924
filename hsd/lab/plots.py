"""The lab's plot: each metric against sampling steps, teacher and students, with the exact rows as floors."""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_path
from .evaluate import COLUMNS, REFERENCE_MODELS, Row

PLOTTED = ["precision", "recall", "dispersion", "swd", "swd_ode", "mmd", "traj_err", "traj_teacher", "alignment",
           "loglik"]


def series(rows: list[Row]) -> dict[str, list[Row]]:
    """Lines to draw: one per (model, sampler); the stage-k LoRAs (each at its own k steps) as one line; of the
    feedback merges only the last weight (the table's largest)."""
    out: dict[str, list[Row]] = {}
    merges = [r.model for r in rows if r.model.startswith("TSCD + feedback")]
    for r in rows:
        if r.steps == 0 or (r.model in merges and r.model != merges[-1]):
            continue
        key = "TSCD stage k at k steps, DDIM" if r.model.startswith("TSCD stage") else f"{r.model}, {r.scheduler}"
        out.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r.steps) for k, v in out.items()}


def save_plot(rows: list[Row], path: Path, title: str = "") -> None:
    """A PNG grid of panels, one per metric (steps on a log axis; dashed: the exact reference rows)."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch inside a user's notebook
    heads = {c: h for c, h, _ in COLUMNS}
    fig = Figure(figsize=(22, 8.5))
    axes = fig.subplots(2, 5)
    lines = series(rows)
    for ax, metric in zip(axes.flat, PLOTTED):
        for i, (name, pts) in enumerate(lines.items()):
            pts = [r for r in pts if metric in r.values]
            if pts:
                ax.plot([r.steps for r in pts], [r.values[metric] for r in pts], "o-" if len(pts) > 1 else "s",
                        label=name, color=f"C{i % 10}", lw=1.2, ms=4)
        for r, style in zip([r for r in rows if r.model in REFERENCE_MODELS], ("--", ":")):
            if metric in r.values:
                ax.axhline(r.values[metric], ls=style, color="k", lw=1, label=r.model)
        ax.set_xscale("log", base=2)
        ax.set_title(heads[metric])
        ax.set_xlabel("steps")
        if metric in ("traj_err", "traj_teacher", "swd", "swd_ode", "dispersion"):
            ax.set_yscale("log")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat[1:]:  # one legend for all panels: every line that appears anywhere
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
