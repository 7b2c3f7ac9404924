"""Restates docs/lab.md's main ablation (TSCD vs one-stage vs CD, 5 seeds) from its published mean ± std:
# Usage: .venv/bin/python scripts/restate_published.py docs/lab.md
Welch's t-test (scipy.stats.ttest_ind_from_stats, Welch-Satterthwaite df) and Benjamini-Hochberg over each
table's 64 cells. Unpaired, hence conservative: the shared-seed covariance cannot be removed without per-seed data."""
import re, sys
from scipy import stats
lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith("## Ablations"))
end = next(i for i, l in enumerate(lines) if l.startswith("### Verdict"))
tables, cur = [], None
for l in lines[start:end]:
    if l.startswith("| Arm |"):
        cur = {"head": [h.strip() for h in l.strip("|").split("|")][2:], "rows": {}}; tables.append(cur)
    elif cur is not None and l.startswith("| ") and "±" in l and "**" not in l and not re.match(r"\| \S+ \| \d \| [+-]", l):
        cells = [c.strip() for c in l.strip("|").split("|")]
        cur["rows"][(cells[0], int(cells[1]))] = [tuple(map(float, c.split("±"))) for c in cells[2:]]
    elif not l.startswith("|"):
        cur = None if cur is None or cur["rows"] else cur
names = ["LoRA for k steps (DDIM)", "final LoRA with TCD"]
for name, t in zip(names, [t for t in tables if t["rows"]]):
    cells = []
    for arm in ("ctm", "cd"):
        for k in (1, 2, 4, 8):
            for j, h in enumerate(t["head"]):
                (m0, s0), (m1, s1) = t["rows"][("tscd", k)][j], t["rows"][(arm, k)][j]

                s0, s1 = max(s0, 5e-5), max(s1, 5e-5)
                r = stats.ttest_ind_from_stats(m1, s1, 5, m0, s0, 5, equal_var=False)
                cells.append((arm, k, h, m1 - m0, r.pvalue))
    q = stats.false_discovery_control([c[4] for c in cells], method="bh")
    print(f"\n{name}: {sum(q <= 0.05)} of {len(cells)} cells with q <= 0.05")
    print("| Arm | Steps | " + " | ".join(t["head"]) + " |\n|---|---|" + "---|" * len(t["head"]))
    for arm in ("ctm", "cd"):
        for k in (1, 2, 4, 8):
            row = [(c, qq) for c, qq in zip(cells, q) if c[0] == arm and c[1] == k]
            out = [f"{c[3]:+.4f} q={qq:.3f}" for c, qq in row]
            out = [f"**{o}**" if qq <= 0.05 else o for o, (c, qq) in zip(out, row)]
            print(f"| {'one_stage' if arm == 'ctm' else arm} | {k} | " + " | ".join(out) + " |")
