"""The one-shot GPU check: every GPU measurement hsd lacks, each in its own process with a time budget, within
8 minutes on one GPU; results as JSON and a markdown table. `scripts/gpu_check.sh` installs what is missing and
runs this; `--dry-run` runs the same plan on the CPU with tiny models (what tests/test_gpu_check.py exercises).

    python benchmarks/gpu_check.py [--dry-run] [--budget 450] [--only env tscd_sd15 ...] [--set tscd_sd15.micro=[2,8]]

Results: $OUT (or gpu_check/ in the repo) gets gpu_check.json, gpu_check.md and logs/<measurement>.log. This
process never imports torch, so a child's crash, OOM or hang costs only that child: it is killed at its budget and
its rows so far, its one-line error or its reason are recorded, and the next measurement runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from gpu_check_report import markdown, write_json

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "gpu_check_measure.py"

# name: (title, cap seconds on a GPU, least seconds worth starting it with, GPU params, dry-run params, needs)
PLAN = {
    "env": ("torch, CUDA and the GPU", 40, 10, {}, {}, None),
    "tscd_sd15": ("TSCD LoRA step, SD1.5 512 px (+ 1-step generation)", 80, 40,
                  dict(arch="sd15", resolution=512, micro=[1, 8], steps=3, warmup=1, gen_reserve=15),
                  dict(arch="tiny-sd15", resolution=32, micro=[1, 2], steps=1, warmup=1, gen_reserve=8), None),
    "tscd_sdxl": ("TSCD LoRA step, SDXL 1024 px (+ 1-step generation)", 110, 50,
                  dict(arch="sdxl", resolution=1024, micro=[1, 4], steps=3, warmup=1, gen_reserve=20),
                  dict(arch="tiny-sdxl", resolution=32, micro=[1], steps=1, warmup=1, gen_reserve=8), None),
    "tscd_sd3": ("TSCD LoRA step, SD3-medium 1024 px (+ 4-step generation)", 100, 50,
                 dict(arch="sd3", resolution=1024, micro=[1, 4], steps=3, warmup=1, gen_reserve=25),
                 dict(arch="tiny-sd3", resolution=16, micro=[1], steps=1, warmup=1, gen_reserve=8), None),
    "tscd_flux": ("TSCD LoRA step, FLUX.1-dev 1024 px (+ 8-step generation)", 150, 70,
                  dict(arch="flux", resolution=1024, micro=[1, 2], steps=2, warmup=1, gen_reserve=30),
                  dict(arch="tiny-flux", resolution=16, micro=[1], steps=1, warmup=1, gen_reserve=8), None),
    "tscd_flux_quantized": ("TSCD LoRA step, FLUX.1-dev 1024 px on an int8 / NF4 base, conditioning cached (issue 23)",
                            150, 60, dict(arch="flux", resolution=1024, micro=1, steps=2, warmup=1,
                                          quantize=["int8", "nf4"]),
                            dict(arch="tiny-flux", resolution=16, micro=1, steps=1, warmup=1,
                                 quantize=["int8", "nf4"]), None),
    "dmd_sdxl": ("DMD one-step UNet step, SDXL 1024 px (full generator + full fake, t=800)", 120, 50,
                 dict(arch="sdxl", resolution=1024, steps=2, warmup=1, strategy="fsdp"),
                 dict(arch="tiny-sdxl", resolution=32, steps=1, warmup=1, strategy="auto"), None),
    "scorers": ("random-weight scorers written (CLIP, Aes, ImageReward, PickScore)", 70, 25,
                dict(size="real"), dict(size="tiny"), None),
    "feedback_sd15": ("feedback LoRA step, SD1.5 512 px, real-size scorers", 80, 40,
                      dict(arch="sd15", resolution=512, size="real", steps=2, warmup=1),
                      dict(arch="tiny-sd15", resolution=64, size="tiny", steps=1, warmup=1), "scorers"),
    "eval": ("eval throughput, all four scorers, 512 px", 50, 20,
             dict(size="real", n=96, image_size=512, batch=16),
             dict(size="tiny", n=4, image_size=64, batch=2), "scorers"),
}
VERSIONS = ("torch", "torchvision", "lightning", "transformers", "peft", "diffusers", "open_clip_torch", "timm",
            "omegaconf", "webdataset", "torchmetrics", "safetensors", "numpy", "pillow", "mmdet", "mmcv", "hsd")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 1-2 steps: checks the check")
    p.add_argument("--budget", type=float, help="seconds for all measurements (default 450 on a GPU, 600 dry)")
    p.add_argument("--only", nargs="+", choices=list(PLAN), help="run these measurements (env always runs)")
    p.add_argument("--set", action="append", default=[], metavar="NAME.KEY=JSON",
                   help="override a measurement's parameter, e.g. tscd_sdxl.micro=[1,2]")
    p.add_argument("--out", type=Path, help="default: $OUT, else gpu_check/ in the repo")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary models and scorers")
    p.add_argument("--quiet", action="store_true", help="do not print the markdown at the end")
    return p.parse_args(argv)


def plan_params(args) -> dict[str, dict]:
    params = {name: dict(spec[4 if args.dry_run else 3]) for name, spec in PLAN.items()}
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        if name not in params or not field or not value:
            raise SystemExit(f"gpu_check: --set {item!r}: expected NAME.KEY=VALUE with NAME one of {', '.join(PLAN)}")
        try:
            params[name][field] = json.loads(value)
        except json.JSONDecodeError:
            params[name][field] = value
    return params


def versions() -> dict[str, str | None]:
    out = {}
    for dist in VERSIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def install_info(out: Path) -> dict:
    """What scripts/gpu_check.sh installed from the wheel folder, and how long it took (nothing when run directly)."""
    seconds = os.environ.get("HSD_GPU_CHECK_INSTALL_S")
    return {"installed": os.environ.get("HSD_GPU_CHECK_INSTALLED", "").split(),
            "seconds": float(seconds) if seconds else None, "by_script": seconds is not None,
            "log": "install.log" if (out / "install.log").exists() else None}


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return lines[-1][:300] if lines else "no output"


def run_one(name: str, params: dict, timeout: float, work: Path, out: Path, dry: bool) -> dict:
    """One measurement in its own process; its result file is read whatever happened to the process."""
    result, log = work / f"{name}.json", out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "TMPDIR": str(work), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(CHILD), name, "--result", str(result), "--work", str(work), "--deadline",
           str(time.time() + timeout - 3), "--params", json.dumps(params), *(["--dry-run"] if dry else [])]
    start, status, reason = time.perf_counter(), "ok", None
    with open(log, "w") as f:
        # its own process group: at the budget, the child and whatever it started (loader workers) are killed
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status, reason = None, "timeout", f"killed at its time budget of {timeout:.0f} s"
    got = json.loads(result.read_text()) if result.exists() else {}
    if rc:
        status, reason = "failed", got.get("error") or f"exit status {rc}: {last_line(log)}"
    rows = got.get("rows", [])
    if status == "ok" and any("error" in r for r in rows):
        status, reason = "partial", "; ".join(f"{r['label']}: {r['error']}" for r in rows if "error" in r)
    if status == "ok" and not rows:
        status, reason = "failed", "the measurement recorded nothing"
    return {"status": status, "reason": reason, "seconds": round(time.perf_counter() - start, 1),
            "timeout_s": round(timeout), "params": got.get("params", params), "rows": rows,
            "notes": got.get("notes", []), "info": got.get("info", {}), "log": str(log.relative_to(out))}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (600.0 if args.dry_run else 450.0)
    wanted = set(args.only or PLAN) | {"env"} | {PLAN[n][5] for n in args.only or ()} - {None}
    params, names = plan_params(args), [n for n in PLAN if n in wanted]  # with what they need, in plan order
    work = Path(tempfile.mkdtemp(prefix="hsd-gpu-check-", dir=os.environ.get("HSD_GPU_CHECK_TMP")))
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    report = {"schema": "hsd-gpu-check/1", "mode": "dry-run" if args.dry_run else "gpu", "started_at": started,
              "budget_s": budget, "git_commit": git_commit(), "python": sys.version.split()[0],
              "versions": versions(), "install": install_info(out),
              "env": {}, "measurements": []}
    for i, name in enumerate(names):
        title, cap, least, *_ = PLAN[name]
        later = sum(PLAN[n][2] for n in names[i + 1:])
        left = budget - (time.perf_counter() - t0)
        timeout = min(cap * (3 if args.dry_run else 1), left - later)
        need = PLAN[name][5]
        done = {m["name"]: m for m in report["measurements"]}
        if need and need in names and done.get(need, {}).get("status") not in ("ok", "partial"):
            m = {"status": "skipped", "reason": f"needs '{need}', which did not finish: {done[need]['reason']}"}
        elif report["env"].get("cuda_expected") and not report["env"].get("cuda_available"):
            m = {"status": "skipped", "reason": "no CUDA device visible to torch (see env)"}
        elif timeout < least:
            m = {"status": "skipped", "reason": f"{left:.0f} s left of the {budget:.0f} s budget, {later} s kept for "
                                                f"the measurements after it; it needs at least {least} s"}
        else:
            print(f"[gpu_check] {name}: {title} (up to {timeout:.0f} s)", flush=True)
            m = run_one(name, params[name], timeout, work, out, args.dry_run)
        m = {"name": name, "title": title, "rows": [], "params": params[name], **m}
        report["measurements"].append(m)
        if name == "env":
            report["env"] = m.pop("info", {}) or {"error": m["reason"]}
        print(f"[gpu_check] {name}: {m['status']}{' - ' + m['reason'] if m.get('reason') else ''}", flush=True)
        finish(report, t0, out)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    md = finish(report, t0, out)
    if not args.quiet:
        print(md)
    return 0


def finish(report: dict, t0: float, out: Path) -> str:
    """Summary fields, then gpu_check.json and gpu_check.md (rewritten after every measurement)."""
    ms = report["measurements"]
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["ran"] = [m["name"] for m in ms if m["status"] in ("ok", "partial")]
    report["failed"] = {m["name"]: m["reason"] for m in ms if m["status"] in ("failed", "timeout", "partial")}
    report["skipped"] = {m["name"]: m["reason"] for m in ms if m["status"] == "skipped"}
    write_json(report, out / "gpu_check.json")
    md = markdown(report)
    (out / "gpu_check.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
