"""The stage plan: seeds derive in one place, each stage knows the settings that shape it, and a rerun into a run
folder under other settings is refused by name while cosmetic changes reuse what is there."""
import csv

import pytest

from hsd.cli import main
from hsd.config import load_config
from hsd.train import shaping_settings, stage_seeds

TINY = ["tscd.stages=[{k: 2, grid_steps: 16, iterations: 2}]", "tscd.batch_size=4", "lab.eval_per_class=4",
        "lab.student_steps=[1]", "lab.teacher_steps=2", "trainer.progress_bar=false", "trainer.log_every=1"]


def test_seeds_derive_from_the_run_seed_and_the_stage_slot():
    assert stage_seeds(3, 0) == (3, 300) and stage_seeds(3, 2) == (5, 302) and stage_seeds(0, 60) == (60, 60)


def test_each_stage_is_shaped_by_its_own_settings_and_those_before_it():
    cfg = load_config([], ["feedback.iterations=2", "feedback.rewards={lab: {margin: 1, weight: 1}}",
                           "dmd.iterations=2"])
    first, fb, dmd = (shaping_settings(cfg, "tscd", 0), shaping_settings(cfg, "feedback"),
                      shaping_settings(cfg, "dmd"))
    assert {"seed", "world", "lora.rank", "tscd.lr", "lab.teacher", "trainer.devices"} <= first.keys()
    assert first["tscd.stages"] == [{"k": 8, "grid_steps": 32, "iterations": 200, "w_mse": 1.0, "w_adv": 0.0}]
    assert not {k for k in first if k.startswith(("feedback.", "dmd."))}
    assert not {"name", "out_dir", "lab.eval_per_class", "trainer.progress_bar", "trainer.logger",
                "model.gradient_checkpointing"} & first.keys()
    assert len(fb["tscd.stages"]) == 4 and "feedback.lr" in fb and "feedback.merge_weights" not in fb
    assert "dmd.lr" in dmd and "feedback.rewards" not in dmd  # DMD uses the feedback losses only with w_feedback
    with_losses = shaping_settings(load_config([], ["dmd.w_feedback=1"]), "dmd")
    assert "feedback.rewards" in with_losses and "feedback.lr" not in with_losses  # its losses, not its training


def test_rerun_reuses_under_cosmetic_changes_and_refuses_changed_settings(tmp_path, capsys):
    args = ["train", "experiments/lab/tscd.yaml", *TINY, f"out_dir={tmp_path}", "name=r"]
    main([*args, "trainer.logger=csv"])
    rows = list(csv.DictReader(open(tmp_path / "r" / "csv" / "stage0_k2" / "metrics.csv")))
    assert rows and "train/loss_k2" in rows[-1]  # the CSV logger, chosen by config
    lora = (tmp_path / "r" / "lora_stage0_k2.safetensors").read_bytes()
    main([*args, "lab.eval_per_class=2", "trainer.logger=tensorboard"])  # report-only and logging changes
    assert (tmp_path / "r" / "lora_stage0_k2.safetensors").read_bytes() == lora
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*args, "tscd.lr=0.01"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("hsd: error: ") and "stage 'tscd k=2'" in err and "tscd.lr: 0.001 -> 0.01" in err


def test_an_unfinished_stage_may_resume_longer_but_not_otherwise_changed(tmp_path):
    import yaml

    from hsd.config import ConfigError
    from hsd.train import Stage, refuse_changed_settings

    def stage(*over):
        cfg = load_config([], ["tscd.stages=[{k: 8, iterations: 2}, {k: 4, iterations: 2}]", *over])
        return Stage(kind="tscd", name="tscd k=4", folder=tmp_path / "stage1_k4",
                     artefact=tmp_path / "lora.safetensors",
                     slot=1, updates=2, batch_size=4, settings=shaping_settings(cfg, "tscd", 1), build=None,
                     save=None)

    (tmp_path / "stage1_k4" / "checkpoints").mkdir(parents=True)
    (tmp_path / "stage1_k4" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "stage1_k4" / "settings.yaml").write_text(yaml.safe_dump(stage().settings))
    refuse_changed_settings([stage("tscd.stages.1.iterations=9")])  # resumed to run longer
    with pytest.raises(ConfigError, match="trainer.devices: 1 -> 2"):  # its batches would be split otherwise
        refuse_changed_settings([stage("trainer.devices=2")])
    with pytest.raises(ConfigError, match="tscd.stages: .*'iterations': 2"):  # an earlier stage's length
        refuse_changed_settings([stage("tscd.stages.0.iterations=9")])
    (tmp_path / "lora.safetensors").write_bytes(b"")  # finished: its length is part of what it is
    with pytest.raises(ConfigError, match="already holds stage 'tscd k=4'"):
        refuse_changed_settings([stage("tscd.stages.1.iterations=9")])
    refuse_changed_settings([stage("trainer.devices=2")])  # a finished LoRA is reused on any number of devices


def test_every_stage_logs_each_loss_terms_gradient_norm(tmp_path):
    """grad/<term> (trainer.grad_norms_every): TSCD's MSE and adversarial terms, the feedback reward, DMD's
    distribution-matching and consistency terms, each the norm of its own gradient over the trained tensors."""
    stages = "tscd.stages=[{k: 2, grid_steps: 16, iterations: 2, w_adv: 0.5}]"
    main(["train", "experiments/lab/hypersd.yaml", *TINY, stages, "tscd.adv.hidden=8", "feedback.iterations=2",
          "feedback.batch_size=4", "dmd.iterations=2", "dmd.batch_size=4", "dmd.fake_updates=1",
          "dmd.w_consistency=1", "lab.world=blocks", "trainer.grad_norms_every=1", "trainer.logger=csv",
          "feedback.merge_weights=[1]",
          f"out_dir={tmp_path}", "name=g"])

    def logged(stage):
        rows = list(csv.DictReader(open(tmp_path / "g" / "csv" / stage / "metrics.csv")))
        return {k: float(r[k]) for r in rows for k in r if k.startswith("grad/") and r[k]}

    assert logged("stage0_k2").keys() == {"grad/mse", "grad/adv"}
    assert logged("feedback").keys() == {"grad/reward"}
    assert logged("dmd").keys() == {"grad/dmd", "grad/consistency"}
    assert all(v > 0 for stage in ("stage0_k2", "feedback", "dmd") for v in logged(stage).values())


def test_the_ema_target_refuses_names_the_network_does_not_have():
    import torch

    from hsd.models.ema import EMA
    net = torch.nn.Linear(2, 2)
    assert set(EMA({"weight": net.weight}).tensors_for(net)) == {"weight"}
    with pytest.raises(KeyError, match="1 of 2 tensors are not parameters.*'_fsdp_wrapped_module.bias'"):
        EMA({"weight": net.weight, "_fsdp_wrapped_module.bias": net.bias}).tensors_for(net)
