"""Writes the lab's table from one run into docs/lab.md (every row and column) and README.md (selected rows and
columns), between their `<!-- lab-table -->` markers, so that both show the numbers of the same run.

    .venv/bin/python scripts/lab_tables.py runs/lab_hypersd        # the run `hsd lab` writes (seed 0)

tests/test_project.py checks that every README cell equals docs/lab.md's cell of the same row and column.
"""
import argparse
import csv
import re
from pathlib import Path

from hsd.lab.evaluate import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- lab-table: begin (scripts/lab_tables.py) -->", "<!-- lab-table: end -->"
README_COLUMNS = ["precision", "recall", "dispersion", "swd_ode", "mmd", "traj_teacher", "loglik"]
README_ROWS = [("Data (exact samples)", "0", None), ("Exact ODE (other noise)", "0", None),
               ("Teacher", "1", None), ("Teacher", "4", None), ("Teacher", "25", None),
               ("TSCD stage k=4", "4", None), ("TSCD stage k=1", "1", None),
               ("TSCD final (k=1)", "4", "DDIM trailing"), ("TSCD final (k=1)", "8", "TCD eta=0.3"),
               ("TSCD + feedback, weights (1, 1)", "1", None), ("TSCD final (k=1)", "1", "LCM t=800"),
               ("DMD one-step LoRA (t=800)", "1", None)]


def replace_block(text: str, block: str, where: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where}: no {BEGIN} ... {END} block to replace")
    return pattern.sub(lambda _: f"{BEGIN}\n{block}{END}", text)


def readme_table(rows: list[dict]) -> str:
    heads = {c: h for c, h, _ in COLUMNS}
    fmts = {c: f for c, _, f in COLUMNS}
    lines = ["| Model | Steps | Sampler | " + " | ".join(heads[c] for c in README_COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(README_COLUMNS)]
    for model, steps, sampler in README_ROWS:
        r = next((r for r in rows if r["model"] == model and r["steps"] == steps
                  and (sampler is None or r["scheduler"] == sampler)), None)
        if r is None:
            raise SystemExit(f"the run's table.csv has no row {model!r} at {steps} steps ({sampler or 'any'})")
        cells = [fmts[c].format(float(r[c])) if r[c] else "—" for c in README_COLUMNS]
        lines.append(f"| {model} | {'—' if steps == '0' else steps} | {r['scheduler']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a lab run folder with table.md and table.csv")
    args = p.parse_args()
    table_md = (args.run / "table.md").read_text()
    full = "\n".join(ln for ln in table_md.splitlines() if ln.startswith("|")) + "\n"
    with open(args.run / "table.csv") as f:
        rows = list(csv.DictReader(f))
    for path, block in ((ROOT / "docs/lab.md", full), (ROOT / "README.md", readme_table(rows))):
        path.write_text(replace_block(path.read_text(), block, str(path)))
        print(f"wrote the table of {args.run} into {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
