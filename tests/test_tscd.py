import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from hsd.config import load_config
from hsd.diffusion.segments import ddim_grid, sample_times
from hsd.lab.teacher import MissingTeacherError, load_teacher, teacher_path
from hsd.lit.trainer import make_trainer
from hsd.lit.tscd import TSCDModule
from hsd.losses.consistency import tscd_loss
from hsd.models.ema import EMA
from hsd.models.lora import LoraFormatError, load_lora, lora_params, save_lora
from hsd.worlds.lab import LabData


def _module(lab_parts, k=4, iterations=6):
    teacher, sched, _, _ = lab_parts
    cfg = load_config([], [f"tscd.stages=[{{k: {k}, grid_steps: 16, iterations: {iterations}}}]",
                           "tscd.batch_size=8"])
    return TSCDModule(teacher.unet, sched, cfg.tscd.stages[0], cfg.tscd, seed=3), cfg


def _batch(world, lab_parts, index=0):
    _, _, emb, empty = lab_parts
    return LabData(world, emb, empty, 8, 10).make_batch(index) | {"index": index}


def test_k1_is_ctm_and_boundary_is_cd():
    grid = ddim_grid(1000, 32)
    s = sample_times(grid, 1, 1000, 2048, torch.Generator().manual_seed(0))
    assert (s.t_b == 0).all() and s.t_end.min() == 0 and (s.t_end > 0).float().mean() > 0.9  # CTM: any t_end
    cd = sample_times(grid, 1, 1000, 64, torch.Generator().manual_seed(0), t_end="boundary")
    assert (cd.t_end == 0).all()


def test_ema_update_is_exact():
    p = {"a": torch.randn(5, dtype=torch.float64), "b": torch.randn(2, 3, dtype=torch.float64)}
    ema = EMA(p)
    q = {k: torch.randn_like(v) for k, v in p.items()}
    ema.update(q, 0.9)
    for k in p:
        assert torch.equal(ema.tensors()[k], 0.9 * p[k] + (1 - 0.9) * q[k])


def test_loss_is_zero_when_student_reproduces_target_map(world, lab_parts):
    module, _ = _module(lab_parts)
    pred, target, d = module.tscd_pair(_batch(world, lab_parts), torch.Generator().manual_seed(0))
    assert tscd_loss(pred, target) > 1e-6  # the student (= teacher at init) is not yet consistent
    # The eps that makes Psi(x_tn, eps, t_n -> t_end) land on the target: a student reproducing the map.
    a_t, s_t = module.schedule.coeffs(d["t_n"], target)
    a_s, s_s = module.schedule.coeffs(d["t_end"], target)
    eps = (target - a_s / a_t * d["x_tn"]) / (s_s - a_s * s_t / a_t)
    star = module.schedule.jump(d["x_tn"], eps, d["t_n"], d["t_end"])
    assert tscd_loss(star, target).item() < 1e-10
    assert tscd_loss(star, target, kind="huber").item() < 1e-9


def test_only_lora_parameters_get_gradients(world, lab_parts):
    module, _ = _module(lab_parts)
    pred, target, _ = module.tscd_pair(_batch(world, lab_parts), torch.Generator().manual_seed(0))
    tscd_loss(pred, target).backward()
    named = dict(module.unet.named_parameters())
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n)
    lora = lora_params(module.unet)
    assert lora and all(p.grad is not None for p in lora.values())
    assert sum(p.grad.abs().sum() for n, p in lora.items() if "lora_B" in n) > 0
    assert all(not p.requires_grad for n, p in named.items() if "lora_" not in n)


def _losses(trainer_fn):
    class Rec(L.Callback):
        def __init__(self):
            self.losses = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses[int(batch["index"])] = outputs["loss"].item()
    rec = Rec()
    trainer_fn(rec)
    return rec.losses


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_reproduces_uninterrupted_losses(world, tmp_path, accumulate):
    """7 updates (of `accumulate` micro-batches each) uninterrupted == 3 updates, stop, resume to 7."""
    def run(out, updates, ckpt=None, rec=None):
        teacher = load_teacher(teacher_path("blocks"))
        from hsd.diffusion.schedule import NoiseSchedule
        from hsd.models.lora import attach_lora
        cfg = load_config([], ["tscd.stages=[{k: 2, grid_steps: 16, iterations: 7}]", "tscd.batch_size=8",
                               f"tscd.accumulate={accumulate}", "trainer.progress_bar=false"])
        L.seed_everything(0, verbose=False)  # LoRA A is drawn at random: seed before attaching
        attach_lora(teacher.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
        emb = teacher.encode(world.prompts + [""])
        module = TSCDModule(teacher.unet, NoiseSchedule.from_scheduler(teacher.scheduler),
                            cfg.tscd.stages[0], cfg.tscd, seed=5)
        trainer = make_trainer(cfg, out / "stage0_k2", updates, 3, [rec])
        data = LabData(world, emb[:-1], emb[-1:], 8, 7 * accumulate, seed=5)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        assert trainer.global_step == updates  # optimizer updates, not micro-batches
        return module

    # 3 done of 7: the remaining 4 differ from the 3 done, so an epoch cut short or replayed would show.
    full = _losses(lambda rec: run(tmp_path / "a", 7, rec=rec))
    first = _losses(lambda rec: run(tmp_path / "b", 3, rec=rec))
    ckpt = tmp_path / "b" / "stage0_k2" / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and sorted(first) == list(range(3 * accumulate))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all("lora_" in k or k.startswith("ema.") for k in state)  # no frozen teacher weights
    rest = _losses(lambda rec: run(tmp_path / "b", 7, ckpt=ckpt, rec=rec))
    assert sorted(rest) == list(range(3 * accumulate, 7 * accumulate))
    for i in range(7 * accumulate):
        assert (first | rest)[i] == pytest.approx(full[i], rel=1e-6, abs=1e-9), i


def test_lora_roundtrip_and_bad_layout(lab_parts, tmp_path):
    teacher = lab_parts[0]
    with torch.no_grad():
        for p in lora_params(teacher.unet).values():
            p.normal_()
    saved = {n: p.clone() for n, p in lora_params(teacher.unet).items()}
    path = save_lora(tmp_path / "l.safetensors", teacher.unet)
    with torch.no_grad():
        for p in lora_params(teacher.unet).values():
            p.zero_()
    load_lora(teacher.unet, path)
    assert all(torch.equal(saved[n], p) for n, p in lora_params(teacher.unet).items())
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "kohya.safetensors")
    with pytest.raises(LoraFormatError, match="kohya.safetensors.*expected layout"):
        load_lora(teacher.unet, tmp_path / "kohya.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFormatError, match="junk.safetensors"):
        load_lora(teacher.unet, tmp_path / "junk.safetensors")


def test_w_adv_without_discriminator_is_refused(lab_parts):
    teacher, sched, _, _ = lab_parts
    cfg = load_config([], ["tscd.stages=[{k: 2, w_adv: 0.5}]"])
    with pytest.raises(ValueError, match="w_adv=0.5 but no discriminator was given"):
        TSCDModule(teacher.unet, sched, cfg.tscd.stages[0], cfg.tscd)


def test_missing_teacher_names_the_command(tmp_path):
    with pytest.raises(MissingTeacherError, match="hsd lab-teacher"):
        load_teacher(tmp_path / "nowhere")
