"""Prints docs-sized views of an `hsd ablate` folder: per arm mean ± std, and each arm's paired difference from the
first arm with q (the same tests, over the same family of cells, as `ablation.md`), for a chosen set of rows.

    .venv/bin/python scripts/ablation_tables.py runs/ablation hypersd one_stage cd --seeds 0 1 2 3 4 --rows lora
    ... --rows tcd          # the final LoRA with TCD at 1-8 steps
    ... --rows feedback     # the feedback merges and DMD rows (arms that have them)
"""
import argparse
from pathlib import Path

from hsd.ablate import COMPARED, FDR, HEADS, is_reference, paired_tests, table_rows

ROWS = {
    "lora": lambda k: k[0] == "LoRA for k steps" and k[2] == "DDIM trailing",
    "tcd": lambda k: k[0] == "TSCD final (k=1)" and k[2].startswith("TCD"),
    "feedback": lambda k: k[0].startswith(("TSCD + feedback", "DMD")) or k[2].startswith("LCM"),
    "reference": is_reference,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("arms", nargs="+", help="config names (the first is the reference arm)")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--rows", choices=sorted(ROWS), default="lora")
    p.add_argument("--columns", nargs="+", default=COMPARED)
    a = p.parse_args()
    results = {arm: [table_rows(a.out / f"{arm}_seed{s}" / "table.csv") for s in a.seeds] for arm in a.arms}
    tests = paired_tests(results)
    keys = [k for k in results[a.arms[0]][0] if ROWS[a.rows](k)]
    head = "| Arm | Model | Steps | Sampler | " + " | ".join(HEADS[c] for c in a.columns) + " |"
    rule = "|---|---|---|---|" + "---|" * len(a.columns)
    print(f"Mean ± sample std over seeds {a.seeds}\n\n{head}\n{rule}")
    for key in sorted(keys, key=lambda k: (k[1], k[0])):
        for arm in a.arms[:1] if is_reference(key) else a.arms:
            if key not in results[arm][0]:
                continue
            cells = []
            for c in a.columns:
                v = [r[key][c] for r in results[arm] if c in r.get(key, {})]
                m = sum(v) / len(v) if v else float("nan")
                sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
                cells.append(f"{m:.4f} ± {sd:.4f}" if v else "")
            print(f"| {arm} | {key[0]} | {key[1] or '—'} | {key[2]} | " + " | ".join(cells) + " |")
    if a.rows == "reference":
        return
    print(f"\nPaired difference from {a.arms[0]}: mean [95 % CI] and q (Benjamini-Hochberg over the {len(tests)} "
          f"cells of the whole comparison); **bold** = q ≤ {FDR:g}\n\n{head}\n{rule}")
    for key in sorted(keys, key=lambda k: (k[1], k[0])):
        for arm in a.arms[1:]:
            if (arm, key, a.columns[0]) not in tests:
                continue
            cells = []
            for c in a.columns:
                t = tests.get((arm, key, c))
                cell = "" if t is None else f"{t.mean:+.4f} [{t.low:+.4f}, {t.high:+.4f}] q={t.q:.3f}"
                cells.append(f"**{cell}**" if t is not None and t.significant(FDR) else cell)
            print(f"| {arm} | {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
