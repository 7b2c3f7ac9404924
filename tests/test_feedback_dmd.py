"""The feedback and DMD stages on the lab: adapters, gradients, the three DMD networks, exact resume, merging,
the one-step UNet, and the configuration errors."""
import lightning as L
import pytest
import torch

from hsd.config import ConfigError, load_config
from hsd.diffusion.schedule import NoiseSchedule, eps_to_x0
from hsd.lab.teacher import load_teacher, teacher_path
from hsd.lit.dmd import DMDModule
from hsd.lit.feedback import FeedbackModule
from hsd.lit.trainer import make_trainer
from hsd.models import lora as lio
from hsd.rewards.feedback import FeedbackLoss
from hsd.worlds.lab import LabData, LabReward

FEEDBACK = ["feedback.rewards={lab: {margin: 1.3, weight: 1.0}}", "feedback.steps=4", "feedback.batch_size=8",
            "feedback.lr=1e-3", "dmd.batch_size=8", "dmd.lr=1e-3", "dmd.fake_lr=1e-3", "dmd.mse_steps=4",
            "trainer.progress_bar=false"]


def _unet(seed=0):
    """The lab teacher with a non-zero "default" (TSCD) LoRA."""
    teacher = load_teacher(teacher_path("blocks"))
    L.seed_everything(seed, verbose=False)
    lio.attach_lora(teacher.unet, 4, 4)
    with torch.no_grad():
        for n, p in lio.lora_params(teacher.unet).items():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return teacher


def _batch(world, teacher, n=8, index=0):
    g = torch.Generator().manual_seed(index)
    emb = teacher.encode(world.prompts + [""])
    labels = torch.randint(4, (n,), generator=g)
    return {"x0": world.sample(labels, g).float(), "labels": labels, "cond": emb[labels],
            "uncond": emb[-1:].expand(n, -1, -1), "index": index}


def _feedback(world, teacher, *over):
    cfg = load_config([], [*FEEDBACK, *over])
    lio.add_adapter(teacher.unet, "feedback", 4, 4)
    sched = NoiseSchedule.from_scheduler(teacher.scheduler)
    return FeedbackModule(teacher.unet, sched, cfg.feedback, FeedbackLoss(cfg.feedback, LabReward(world)), seed=3)


def _dmd(world, teacher, *over, generator="lora", fake="lora"):
    cfg = load_config([], [*FEEDBACK, f"dmd.generator={generator}", f"dmd.fake={fake}", *over])
    gen = lio.plain_unet(teacher.unet, {"default": 1.0}).requires_grad_(True) if generator == "full" else None
    fk = lio.plain_unet(teacher.unet).requires_grad_(True) if fake == "full" else None
    if fake == "lora":
        lio.add_adapter(teacher.unet, "fake", 4, 4)
    loss = FeedbackLoss(cfg.feedback, LabReward(world)) if cfg.dmd.w_feedback else None
    return DMDModule(teacher.unet, NoiseSchedule.from_scheduler(teacher.scheduler), cfg.dmd, loss, seed=3,
                     generator_unet=gen, fake_unet=fk)


def test_feedback_gradient_reaches_only_the_feedback_lora(world):
    teacher = _unet()
    module = _feedback(world, teacher)
    batch = _batch(world, teacher)
    g = torch.Generator().manual_seed(0)
    x0 = module.x0_from_noise(batch, g)
    losses, rewards = module.loss(x0, batch, module, g)
    assert torch.isfinite(losses["reward"]) and losses["reward"] > 0 and torch.isfinite(rewards["lab"])
    losses["reward"].backward()
    fb, tscd = lio.lora_params(teacher.unet, "feedback"), lio.lora_params(teacher.unet, "default")
    assert all(p.grad is not None for p in fb.values()) and sum(p.grad.abs().sum() for p in fb.values()) > 0
    assert all(p.grad is None and not p.requires_grad for p in tscd.values())
    assert all(p.grad is None for n, p in teacher.unet.named_parameters() if "lora_" not in n)


def test_feedback_runs_the_tscd_and_feedback_loras_together_and_stops_in_t_range(world):
    teacher = _unet()
    module = _feedback(world, teacher, "feedback.t_range=[999, 999]")
    with torch.no_grad():
        for n, p in lio.lora_params(teacher.unet, "feedback").items():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    batch = _batch(world, teacher)
    x0 = module.x0_from_noise(batch, torch.Generator().manual_seed(1))
    # t_range [999, 999]: no denoising before the gradient step, which starts from x_T at t = 999 ...
    x_T = torch.randn(batch["x0"].shape, generator=torch.Generator().manual_seed(1))
    fused = lio.plain_unet(teacher.unet, {"default": 1.0, "feedback": 1.0})  # ... with both LoRAs fused
    t = torch.full((8,), 999)
    with torch.no_grad():
        expected = eps_to_x0(x_T, fused(x_T, t, encoder_hidden_states=batch["cond"]).sample,
                             *module.schedule.coeffs(t, x_T))
    torch.testing.assert_close(x0.detach(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="holds none of the 4-step grid"):
        _feedback(world, _unet(), "feedback.t_range=[0, 100]")


def test_dmd_updates_touch_only_their_own_tensors_and_the_teacher_stays_frozen(world):
    teacher = _unet()
    module = _dmd(world, teacher, "dmd.w_mse=1.0")
    before = {n: p.detach().clone() for n, p in teacher.unet.named_parameters()}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    emb = teacher.encode(world.prompts + [""])
    trainer.fit(module, datamodule=LabData(world, emb[:-1], emb[-1:], 8, 1, seed=0))
    changed = {n for n, p in teacher.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any(".default." in n for n in changed) and any(".fake." in n for n in changed)
    assert all(".default." in n or ".fake." in n for n in changed)
    assert trainer.global_step == 2  # one generator + one fake-score step per batch


def test_dmd_fake_score_starts_as_the_teacher_so_the_gradient_is_the_guidance_gap(world):
    """fake LoRA = 0 at the start: fake score = the conditional teacher; at guidance 1 the real score is the same
    network, so the DMD gradient vanishes."""
    teacher = _unet()
    module = _dmd(world, teacher, "dmd.guidance=1.0")
    batch = _batch(world, teacher)
    x0 = torch.randn(8, 3, 8, 8)
    real, fake = module.scores(x0, batch["cond"], batch["uncond"], torch.Generator().manual_seed(0))
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4)
    module = _dmd(world, _unet(), "dmd.guidance=3.0")
    real, fake = module.scores(x0, batch["cond"], batch["uncond"], torch.Generator().manual_seed(0))
    assert (real - fake).abs().mean() > 1e-3


def _fit(module_fn, world, out, updates, ckpt=None, losses=None):
    teacher, module = module_fn()
    emb = teacher.encode(world.prompts + [""])
    cfg = load_config([], FEEDBACK)

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
            losses[int(batch["index"])] = outputs["loss"].item()

    n = module.steps_per_update
    trainer = make_trainer(cfg, out, updates * n, 2 * n, [Rec()] if losses is not None else [])
    data = LabData(world, emb[:-1], emb[-1:], 8, 4, seed=2)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return module


@pytest.mark.parametrize("stage", ["feedback", "dmd", "dmd_full"])
def test_resume_is_exact(world, tmp_path, stage):
    """4 batches uninterrupted == 2, stop, resume to 4: losses and every trained tensor."""
    def make():
        teacher = _unet()
        if stage == "feedback":
            return teacher, _feedback(world, teacher)
        if stage == "dmd":
            return teacher, _dmd(world, teacher, "dmd.fake_updates=2", "dmd.w_mse=0.5", "dmd.w_feedback=1.0")
        return teacher, _dmd(world, teacher, generator="full", fake="full")

    full, first, rest = {}, {}, {}
    a = _fit(make, world, tmp_path / "a", 4, losses=full)
    _fit(make, world, tmp_path / "b", 2, losses=first)
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    b = _fit(make, world, tmp_path / "b", 4, ckpt=ckpt, losses=rest)
    assert sorted(first) == [0, 1] and sorted(rest) == [2, 3]
    for i in range(4):
        assert (first | rest)[i] == pytest.approx(full[i], rel=1e-5), i
    sa, sb = a.trained_tensors(), b.trained_tensors()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_merged_file_equals_the_in_memory_merge(world, tmp_path):
    """`hsd lora merge TSCD FEEDBACK:w` (exact, rank-concatenated) fused into the base == plain_unet's fusion."""
    from hsd.lora_cli import load_unet
    from hsd.models.lora_formats import merge_loras
    teacher = _unet()
    lio.add_adapter(teacher.unet, "feedback", 4, 4)
    with torch.no_grad():
        for n, p in lio.lora_params(teacher.unet, "feedback").items():
            p.normal_(0, 0.05)
    lio.save_lora(tmp_path / "tscd.safetensors", teacher.unet)
    lio.save_lora(tmp_path / "fb.safetensors", teacher.unet, fmt="kohya", adapter="feedback")
    merge_loras([tmp_path / "tscd.safetensors", tmp_path / "fb.safetensors"], [1.0, 0.5], tmp_path / "m.safetensors")
    teacher.unet.disable_adapters()
    base = lio.plain_unet(teacher.unet)
    base.save_pretrained(tmp_path / "base")
    fused = load_unet(tmp_path / "base")
    lio.fuse_loras(fused, [tmp_path / "m.safetensors"], [1.0])
    expected = lio.plain_unet(teacher.unet, {"default": 1.0, "feedback": 0.5})
    for (n, p), q in zip(fused.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_full_generator_writes_a_one_step_unet_that_the_lab_table_samples_with_lcm(tmp_path):
    from hsd.train import run
    teacher = _unet()
    lio.save_lora(tmp_path / "init.safetensors", teacher.unet)
    cfg = load_config([], [*FEEDBACK, "tscd.stages=[]", "dmd.iterations=1", "dmd.generator=full", "dmd.timestep=800",
                           f"model.lora_init={tmp_path / 'init.safetensors'}", f"out_dir={tmp_path}", "name=one",
                           "lab.eval_per_class=4"])
    md = run(cfg)
    assert (tmp_path / "one" / "unet_onestep" / "config.json").exists()
    assert "| DMD one-step UNet (t=800) | 1 | LCM t=800 |" in md


@pytest.mark.parametrize("over, message", [
    (["feedback.rewards={Aes: {margin: 7}}"], "unknown reward"),
    (["feedback.iterations=2"], "no feedback.rewards"),
    (["feedback.iterations=2", "feedback.rewards={lab: {margin: 1}}", "feedback.instance_weight=1"], "SD worlds only"),
    (["dmd.generator=unet"], "'lora' or 'full'"),
    (["dmd.t_min=0.9", "dmd.t_max=0.1"], "t_min < dmd.t_max"),
    (["feedback.rewards.lab.margin=2"], "set a new mapping entry whole"),
])
def test_bad_feedback_and_dmd_settings_are_named(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], over)


def test_sd_rewards_need_a_scorer_folder_and_instance_loss_its_files():
    base = ["world=sd15", "model.path=x", "data.folder=y", "feedback.iterations=1"]
    with pytest.raises(ConfigError, match="needs feedback.scorers"):
        load_config([], [*base, "feedback.rewards={Aes: {margin: 7}}"])
    with pytest.raises(ConfigError, match="needs feedback.solo, feedback.coco_annotations"):
        load_config([], [*base, "feedback.instance_weight=1"])
