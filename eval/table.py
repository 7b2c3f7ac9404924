"""The paper's table layout (Model | Steps | Type | CLIP | Aes | ImageReward | PickScore), ours beside the
paper's where a row matches one of Hyper-SD's Table 2 or Table 4 rows (eval/paper_tables.yaml)."""
from __future__ import annotations

import csv
import io
import json
from functools import lru_cache
from pathlib import Path

import yaml

from hsd.io import atomic_path

COLUMNS = {"CLIP": ("clip", 2), "Aes": ("aes", 2), "ImageReward": ("imagereward", 2), "PickScore": ("pickscore", 3)}


@lru_cache
def paper_rows() -> tuple[dict, ...]:
    data = yaml.safe_load((Path(__file__).with_name("paper_tables.yaml")).read_text())
    return tuple([{**r, "table": "Table 2"} for r in data["rows"]]
                 + [{**r, "table": "Table 4"} for r in data["unified_lora_rows"]])


def paper_row(model: str, steps: int, type_: str) -> dict | None:
    return next((r for r in paper_rows() if (r["model"], r["steps"], r["type"]) == (model, steps, type_)), None)


def rows(summaries) -> list[dict]:
    """One dict per summary: labels, our means, the paper's values (None where no row matches)."""
    out = []
    for s in summaries:
        paper = paper_row(s.spec.paper or s.spec.name, s.spec.steps, s.spec.type)
        row = {"Model": s.spec.name, "Steps": s.spec.steps, "Type": s.spec.type}
        for metric, (key, _) in COLUMNS.items():
            row[metric] = s.scores.get(metric)
            row[f"paper {metric}"] = paper[key] if paper else None
        row.update({"PickScore raw": s.scores.get("PickScore_raw"), "N": s.n, "skipped": len(s.skipped),
                    "paper row": f"{paper['table']}: {paper['model']}" if paper else ""})
        out.append(row)
    return out


def _cell(value, digits: int, paper=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return f"{text} ({paper:.{digits}f})" if paper is not None else text


def markdown(table: list[dict], sha: str, seed: int) -> str:
    head = ["Model", "Steps", "Type", *COLUMNS, "N", "skipped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["Model"], str(r["Steps"]), r["Type"],
                 *(_cell(r[m], d, r[f"paper {m}"]) for m, (_, d) in COLUMNS.items()), str(r["N"]), str(r["skipped"])]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nOurs (paper's value in parentheses where the row matches Hyper-SD's Table 2 or 4). "
            f"PickScore is the cosine; prompts sha256 {sha[:16]}, seeds {seed}+i.\n")
    return "\n".join(lines) + "\n" + note


def write_tables(summaries, out: Path, sha: str, seed: int) -> str:
    """table.md, table.csv and table.json (with the full specs and skipped images) in `out`; returns the md."""
    table = rows(summaries)
    md = markdown(table, sha, seed)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else ["Model"])
    writer.writeheader()
    writer.writerows(table)
    details = {"prompts_sha256": sha, "seed": seed,
               "rows": [{**r, "spec": vars(s.spec) | {"key": s.spec.key()}, "skipped_images": s.skipped}
                        for r, s in zip(table, summaries)]}
    for name, text in [("table.md", md), ("table.csv", buf.getvalue()), ("table.json", json.dumps(details, indent=1))]:
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text)
    return md
