import configparser
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hsd.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_lists_setup_cfg_dependencies():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    setup = {r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {p for p in pip if not p.startswith(("-e", "setuptools"))}
    assert listed == setup


def test_every_experiment_config_loads():
    """Every YAML resolves to a typed config (SD ones given the paths a user passes on the command line)."""
    from hsd.lit.strategies import make_strategy
    records = [ROOT / "experiments" / d for d in ("capacity", "flow_verdict")]  # sweeps' run records, not configs
    files = sorted(f for f in (ROOT / "experiments").rglob("*.yaml")
                   if f.parent.name != "eval" and not any(r in f.parents for r in records))  # eval: specs
    assert len(files) >= 13
    worlds = set()
    for f in files:
        extra = [] if f.parent.name in ("lab", "ablations") else [
            "model.path=/models/x", "data.shards=/data/s.tar", "feedback.scorers=/models/scorers",
            "feedback.solo=/models/solo.pth", "feedback.coco_annotations=/data/i.json", "feedback.coco_images=/data/c",
            "feedback.coco_captions=/data/captions.json"]
        cfg = load_config([str(f)], extra)
        worlds.add(cfg.world)
        assert make_strategy(cfg) is not None
        if f.parent.name in ("sd15", "sdxl") and f.stem.endswith("_cfg"):  # CFG-preserving: one 8-step stage
            assert [s.k for s in cfg.tscd.stages] == [8] and not cfg.tscd.cfg_solver
        elif f.parent.name in ("sd15", "sdxl"):  # the paper's schedule: 8 -> 4 -> 2 -> 1, adversarial at 2, 1
            assert [s.k for s in cfg.tscd.stages] == [8, 4, 2, 1]
            assert [s.w_adv > 0 for s in cfg.tscd.stages] == [False, False, True, True]
            assert cfg.world == f.parent.name
    assert worlds == {"lab", "sd15", "sdxl", "sd3", "flux"}


def test_unknown_config_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tscd:\n  ema_decy: 0.9\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'tscd.ema_decy'.*did you mean 'tscd.ema_decay'"):
        load_config([str(bad)])
    with pytest.raises(ConfigError, match=r"'tscd.stages.0.iteratons'.*'tscd.stages.0.iterations'"):
        load_config([], ["tscd.stages.0.iteratons=3"])
    with pytest.raises(ConfigError, match="tscd.loss must be"):
        load_config([], ["tscd.loss=l1"])


def test_frozen_half_weights_need_autocast():
    with pytest.raises(ConfigError, match="frozen_dtype=bfloat16 needs autocast"):
        load_config([], ["model.frozen_dtype=bfloat16"])
    assert load_config([], ["model.frozen_dtype=bfloat16", "trainer.precision=bf16-mixed"])


def test_fsdp_refuses_fp16_loss_scaling():
    with pytest.raises(ConfigError, match="16-mixed with trainer.strategy=fsdp.*use bf16-mixed"):
        load_config([], ["trainer.strategy=fsdp", "trainer.precision=16-mixed"])
    assert load_config([], ["trainer.strategy=fsdp", "trainer.precision=bf16-mixed"])


def test_cli_reports_bad_key_and_missing_teacher(tmp_path):
    hsd = [sys.executable, "-m", "hsd.cli"]
    r = subprocess.run([*hsd, "lab", "tscd.lrr=1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "unknown config key 'tscd.lrr'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*hsd, "lab", f"lab.teacher={tmp_path}/none", f"out_dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "hsd lab-teacher" in r.stderr and "Traceback" not in r.stderr


def test_lab_metrics_score_mode_centres_as_aligned(world):
    import torch

    from hsd.lab.metrics import metrics as lab_metrics
    labels = torch.arange(4)
    assert lab_metrics(world, world.means[labels, 0], labels)["alignment"] == 1.0


def test_cli_starts_without_heavy_imports():
    """`hsd --help` builds every parser without importing torch (the LoRA CLI keeps its own format list)."""
    from hsd.lora_cli import FORMATS
    from hsd.models.lora_formats import FORMATS as LORA_FORMATS
    assert FORMATS == LORA_FORMATS
    code = "import sys; from hsd.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip().endswith("False"), r.stdout + r.stderr


def _lab_block(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    """{(model, steps, sampler): {column header: cell}} of the table between a file's lab-table markers."""
    text = path.read_text()
    begin, end = "<!-- lab-table: begin", "<!-- lab-table: end -->"
    assert begin in text and end in text, f"{path.name}: no lab-table block"
    lines = [ln for ln in text.split(begin)[1].split(end)[0].splitlines() if ln.startswith("|")]
    heads = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[tuple(cells[:3])] = dict(zip(heads[3:], cells[3:]))
    return out


def test_readme_lab_table_is_docs_lab_tables_run():
    """Both come from one run (scripts/lab_tables.py): every README cell equals docs/lab.md's."""
    readme, docs = _lab_block(ROOT / "README.md"), _lab_block(ROOT / "docs/lab.md")
    assert len(readme) >= 10
    for key, cells in readme.items():
        assert key in docs, f"README row {key} is not in docs/lab.md's table"
        for head, cell in cells.items():
            assert docs[key][head] == cell, f"{key} {head}: README {cell}, docs/lab.md {docs[key][head]}"
