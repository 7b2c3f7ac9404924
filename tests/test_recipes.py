"""The shipped recipes against the paper and the release (issue 14): every stage's k-step sampler queries points of
its training grid, the unified LoRA's TCD steps are points of its grid, the default LoRA targets are the released
module set on the real architectures, and every shipped config loads."""
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, TCDScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from hsd.cli import main
from hsd.config import load_config
from hsd.config.rules import FieldError
from hsd.diffusion.grid import off_grid, trailing
from hsd.diffusion.segments import inference_timesteps
from hsd.models.components import ARCHS
from hsd.models.targets import DEFAULT_TARGETS

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "experiments").glob("*/*.yaml"))
TRAINING = [p for p in CONFIGS if p.parent.name != "eval"]
T = 1000
# What SD configs need besides themselves to pass their world's checks (none of it is opened by load_config).
SD_PATHS = ["model.path=/models/x", "data.folder=/data/x", "feedback.scorers=/s", "feedback.solo=/solo.pth",
            "feedback.coco_annotations=/a.json", "feedback.coco_images=/i", "feedback.coco_captions=/c.json"]


def _load(path: Path):
    sd = "lab" not in path.parts and "ablations" not in path.parts
    return load_config([str(path)], SD_PATHS if sd else [])


def ddim_trailing(k: int) -> list[int]:
    s = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    s.set_timesteps(k)
    return s.timesteps.tolist()


def tcd_default(steps: int) -> list[int]:
    """TCD's timesteps as the release samples the unified LoRA (original_inference_steps left at 50)."""
    s = TCDScheduler(num_train_timesteps=T)
    s.set_timesteps(steps)
    return s.timesteps.tolist()


def test_configs_exist():
    assert len(TRAINING) >= 20
    assert {p.parent.name for p in TRAINING} == {"sd15", "sdxl", "sd3", "flux", "tiny", "lab", "ablations"}


@pytest.mark.parametrize("k", [1, 2, 4, 8, 12])
def test_the_grid_is_what_diffusers_samples_at_the_lora_step_counts(k):
    assert inference_timesteps(T, k).tolist() == ddim_trailing(k)  # the 1/2/4/8-step LoRAs, the 12-step CFG LoRA
    assert off_grid(T, k, 48) == [] and off_grid(T, k, 4 * k) == []


def test_off_grid_names_the_missed_timesteps():
    assert off_grid(T, 8, 50) == [874, 749, 624, 374, 249, 124]  # the pre-issue-14 SD recipes
    assert off_grid(T, 4, 50) == [749, 249]
    assert off_grid(T, 2, 50) == [] and off_grid(T, 1, 50) == []
    assert all(bool(off_grid(T, k, n)) == (n % k != 0) for k in (1, 2, 4, 8) for n in range(k, 101))
    assert trailing(T, 48)[:3] == [20, 41, 61] and trailing(T, 48)[-1] == 999
    assert sorted(np.round(np.arange(T, 0, -T / 50)).astype(int) - 1) == trailing(T, 50)  # diffusers' formula


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_stage_is_sampled_on_its_training_grid(path):
    cfg = _load(path)
    for s in cfg.tscd.stages:
        on_grid = set(trailing(T, s.grid_steps))
        assert set(ddim_trailing(s.k)) <= on_grid or cfg.tscd.allow_misaligned_grid, (path.name, s)
    if path.stem == "grid_misaligned":  # the one ablation arm that measures the misalignment on purpose
        assert cfg.tscd.allow_misaligned_grid and off_grid(T, 8, cfg.tscd.stages[0].grid_steps)
    else:
        assert not cfg.tscd.allow_misaligned_grid


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_unified_lora_is_trained_where_tcd_samples_it(family):
    """The last stage (k = 1) is the unified LoRA, sampled by the release with TCD at 1-8 steps: its grid holds
    TCD's default timesteps (999, 879, 759, ...: TCD's 50-step origin grid), the N-step stages' grid does not."""
    cfg = _load(ROOT / "experiments" / family / "hypersd.yaml")
    final = cfg.tscd.stages[-1]
    assert final.k == 1 and cfg.dmd.timestep == 999 and cfg.dmd.generator == "lora"
    assert tcd_default(4) == [999, 759, 499, 259]
    for steps in (1, 2, 4, 8):
        assert set(tcd_default(steps)) <= set(trailing(T, final.grid_steps)), steps
    assert not set(tcd_default(4)) <= set(trailing(T, 48))


def test_a_misaligned_user_grid_is_refused_with_its_reason(capsys):
    with pytest.raises(FieldError) as e:
        load_config([str(ROOT / "experiments/sd15/tscd.yaml")], [*SD_PATHS, "tscd.stages.0.grid_steps=50"])
    assert "tscd.stages.0.grid_steps=50 is not a multiple of k=8" in str(e.value)
    assert "874, 749, 624, 374, 249, 124" in str(e.value) and "allow_misaligned_grid" in str(e.value)
    assert load_config([str(ROOT / "experiments/sd15/tscd.yaml")],
                       [*SD_PATHS, "tscd.stages.0.grid_steps=50", "tscd.allow_misaligned_grid=true"])
    with pytest.raises(SystemExit) as exit_:  # the CLI: one line, exit status 2
        main(["train", str(ROOT / "experiments/lab/tscd.yaml"), "tscd.stages.1.grid_steps=30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0].startswith("hsd: error: ") and "tscd.stages.1.grid_steps=30 is not a multiple of k=4" in err[0]


RELEASED = {"sd15": 278, "sdxl": 788}  # modules in the released Hyper-SD LoRA files (tests/test_lora_formats.py)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_default_targets_are_the_released_module_set(family):
    """peft's own matcher over the real architecture (meta tensors: no memory) selects exactly the released files'
    278 / 788 modules, among them the time projections, shortcuts and down/up-samplers."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHS[family].unet)
    config = LoraConfig(r=4, target_modules=list(DEFAULT_TARGETS))
    picked = [n for n, m in unet.named_modules() if n and check_target_module_exists(config, n)
              and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(picked) == RELEASED[family]
    for part in ("time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"):
        assert any(n.endswith(part) for n in picked), part
    assert load_config([]).lora.targets == DEFAULT_TARGETS


def test_sd_recipes_follow_their_sources():
    """The values docs/sd.md cites, as the configs hold them."""
    sd15, sdxl = (_load(ROOT / f"experiments/{f}/hypersd.yaml") for f in ("sd15", "sdxl"))
    t = sd15.tscd
    assert (t.guidance_min, t.guidance_max) == (5.0, 6.0)         # PCM SD1.5: omega in [4, 5], w = 1 + omega
    assert (sdxl.tscd.guidance_min, sdxl.tscd.guidance_max) == (7.0, 8.0)  # PCM SDXL: omega in [6, 7]
    assert t.ema_decay == 0.0 and t.loss == "huber" and t.huber_c == 0.001  # LCM-LoRA / PCM
    assert [s.w_adv for s in t.stages] == [0.0, 0.0, 0.05, 0.1] and all(s.w_mse == 1.0 for s in t.stages)
    assert t.adv.lr == 1e-5 and t.adv.up_features and t.adv.conditioned  # PCM's rate and features; SDXL-Lightning
    assert (sd15.lora.rank, sd15.dmd.fake_updates, sdxl.dmd.fake_updates) == (64, 10, 5)  # release; DMD2
    assert sd15.dmd.w_consistency > 0 and sd15.feedback.coco_captions
    for family in ("sd15", "sdxl"):
        cfg_lora = _load(ROOT / f"experiments/{family}/tscd_cfg.yaml").tscd
        assert not cfg_lora.cfg_solver and cfg_lora.empty_prompts == 0.1 and cfg_lora.stages[0].k == 8
        assert _load(ROOT / f"experiments/{family}/onestep_unet.yaml").dmd.w_consistency == 0.0
