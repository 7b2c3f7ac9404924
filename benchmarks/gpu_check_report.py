"""The GPU check's report: its JSON written atomically, and the markdown tables (one per measurement)."""
from __future__ import annotations

import json
import os
from pathlib import Path

UNITS = {"s_per_step": "s/step", "images_per_s": "images/s", "peak_gib": "peak GiB", "hsd_ms": "hsd ms",
         "stock_ms": "stock ms", "ratio": "ratio hsd/stock", "build_s": "build s", "load_s": "load s",
         "seconds": "s", "images": "images", "gib_on_disk": "GiB on disk", "micro_batch": "micro-batch",
         "grad_checkpointing": "grad. ckpt"}


def write_json(report: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def row_tables(rows: list[dict]) -> list[str]:
    """One markdown table per kind of row (`table`), in order of first appearance."""
    kinds = list(dict.fromkeys(r.get("table", "") for r in rows))
    out = []
    for kind in kinds:
        out += ["", *row_table([r for r in rows if r.get("table", "") == kind])]
    return out


def row_table(rows: list[dict]) -> list[str]:
    """One markdown table over rows {label, values} | {label, error} | {label, skipped}."""
    cols = []
    for r in rows:
        cols += [k for k in r.get("values", {}) if k not in cols]
    head = ["", *[UNITS.get(c, c) for c in cols], "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [fmt(r["values"].get(c)) if c in r.get("values", {}) else "" for c in cols]
        note = r.get("note") or (f"**failed**: {r['error']}" if "error" in r else r.get("skipped", ""))
        lines.append("| " + " | ".join([r["label"], *vals, note.replace("|", "/")]) + " |")
    return lines


def markdown(report: dict) -> str:
    env, v = report.get("env") or {}, report.get("versions", {})
    gpu = env.get("gpu_name") or ("CPU (dry run)" if report["mode"] == "dry-run" else "no GPU")
    mem = f", {env['gpu_memory_gib']:.0f} GiB" if env.get("gpu_memory_gib") else ""
    lines = [f"# hsd GPU check ({report['mode']})", "",
             f"{gpu}{mem}; torch {env.get('torch') or v.get('torch')} (CUDA {env.get('cuda')}), "
             f"lightning {v.get('lightning')}, transformers {v.get('transformers')}, peft {v.get('peft')}, "
             f"diffusers {v.get('diffusers')}, Python {report.get('python')}; hsd {report.get('git_commit')}; "
             f"{report.get('wall_s')} s of a {report['budget_s']:.0f} s budget, started {report['started_at']}.", "",
             "| measurement | status | seconds | reason |", "|---|---|---|---|"]
    for m in report["measurements"]:
        lines.append(f"| {m['name']} | {m['status']} | {m.get('seconds', '')} | "
                     f"{(m.get('reason') or '').replace('|', '/')} |")
    for m in report["measurements"]:
        if m["name"] == "env" or not m.get("rows"):
            continue
        settings = ", ".join(f"{k}={json.dumps(val)}" for k, val in m["params"].items())
        lines += ["", f"## {m['title']}", "", f"`{m['name']}`: {settings}", *row_tables(m["rows"]), ""]
        lines += [f"- {n}" for n in m.get("notes", [])]
    return "\n".join(lines) + "\n"
