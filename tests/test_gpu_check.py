"""The one-shot GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py) in its dry run: the same driver, plan and
measurement code on the CPU with tiny models. Every measurement ends with numbers or a recorded reason."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STATUSES = {"ok", "partial", "failed", "timeout", "skipped"}
PLAN = ["env", "tscd_sd15", "tscd_sdxl", "tscd_sd3", "tscd_flux", "tscd_flux_quantized", "dmd_sdxl", "scorers", "feedback_sd15", "eval"]


def _env(out: Path) -> dict:
    (out / "work").mkdir()
    return {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "HSD_GPU_CHECK_TMP": str(out / "work")}


def _report(out: Path) -> dict:
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == "hsd-gpu-check/1" and report["mode"] == "dry-run"
    assert report["wall_s"] <= report["budget_s"] + 30
    assert {"torch", "lightning", "transformers", "peft", "diffusers"} <= set(report["versions"])
    assert isinstance(report["env"], dict) and report["env"]
    names = [m["name"] for m in report["measurements"]]
    assert names == [n for n in PLAN if n in names]
    for m in report["measurements"]:
        assert m["status"] in STATUSES and m["title"]
        if m["status"] != "ok":
            assert isinstance(m["reason"], str) and m["reason"], m
        if m["status"] in ("ok", "partial"):
            assert m["rows"], m
        if m["status"] != "skipped":
            assert (out / m["log"]).is_file()
        for row in m["rows"]:
            kinds = [k for k in ("values", "error", "skipped") if k in row]
            assert row["label"] and len(kinds) == 1, row
            if kinds == ["values"]:
                assert any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row["values"].values()), row
            else:
                assert isinstance(row[kinds[0]], str) and row[kinds[0]], row
    assert set(report["ran"]) == {m["name"] for m in report["measurements"] if m["status"] in ("ok", "partial")}
    assert set(report["skipped"]) == {m["name"] for m in report["measurements"] if m["status"] == "skipped"}
    md = (out / "gpu_check.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    return report


def _values(report: dict, name: str) -> list[dict]:
    return [r["values"] for m in report["measurements"] if m["name"] == name for r in m["rows"] if "values" in r]


@pytest.mark.slow
def test_dry_run_measures_everything_through_the_script(tmp_path):
    """The whole plan through scripts/gpu_check.sh (nothing to install here): about 2 min on 2 CPU cores."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--quiet"], env=_env(tmp_path),
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = _report(tmp_path)
    assert [m["name"] for m in report["measurements"]] == PLAN
    assert report["install"]["by_script"] and not report["failed"] and not report["skipped"], report["failed"]
    tscd = _values(report, "tscd_sd15")
    assert {(v["micro_batch"], v["grad_checkpointing"]) for v in tscd if "micro_batch" in v} == {
        (1, False), (1, True), (2, False), (2, True)}
    assert all(v["s_per_step"] > 0 and v["peak_gib"] is None for v in tscd if "micro_batch" in v)
    assert all(_values(report, n)[-1]["ratio"] > 0  # generation
               for n in ("tscd_sd15", "tscd_sdxl", "tscd_sd3", "tscd_flux"))
    quantized = _values(report, "tscd_flux_quantized")
    assert [v["quantize"] for v in quantized] == ["int8", "nf4"] and all(v["s_per_step"] > 0 for v in quantized)
    dmd = next(m for m in report["measurements"] if m["name"] == "dmd_sdxl")
    assert dmd["rows"][0]["values"]["s_per_step"] > 0 and dmd["info"]["checkpoint_files"] == 0  # no 60 GB files
    assert _values(report, "feedback_sd15")[0]["s_per_step"] > 0
    assert _values(report, "eval")[0]["images_per_s"] > 0
    assert not any((tmp_path / "work").iterdir())  # the models, scorers and images drawn are removed


def test_failures_and_budget_are_recorded(tmp_path):
    """A measurement that fails records its one-line error; one the budget cannot fit records why it was skipped.
    (45 s: the env step would leave the TSCD measurement less than the 40 s it needs, so it is skipped.)"""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--quiet",
                        "--budget", "45", "--only", "tscd_sd15", "--set", "tscd_sd15.arch=no-such-arch"],
                       env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = _report(tmp_path)
    env, tscd = report["measurements"]
    assert env["status"] == "skipped" and "budget" in env["reason"]
    assert tscd["status"] == "failed" and "no-such-arch" in tscd["reason"] and "\n" not in tscd["reason"]
    assert tscd["params"]["arch"] == "no-such-arch" and report["failed"] == {"tscd_sd15": tscd["reason"]}
