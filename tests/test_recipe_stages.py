"""Issue 14's stage parts (split from test_recipe_parts.py): the discriminator's independent re-noising, DMD's
fresh fake-score samples, its noise ranges and its consistency term, the instance term's ReFL path, and the lab
table's guided rows for a CFG-preserving LoRA."""
import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from recipe_common import SCHED, _tscd_cfg

from hsd.config import load_config
from hsd.diffusion.schedule import add_noise
from hsd.lab.teacher import load_teacher, teacher_path
from hsd.lit.consistency import ConsistencyPair
from hsd.lit.dmd import DMDModule
from hsd.lit.tscd import TSCDModule
from hsd.models import lora as lio
from hsd.models.adapters import TSCD, Adapters
from hsd.models.discriminator import FeatureDiscriminator, feature_channels
from hsd.rewards.feedback import InstanceTerm, Refl
from hsd.worlds.lab import LabData


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---- 1. the teacher's step: CFG or not ----

LAB_RUN = ["lab.world=blocks", "tscd.batch_size=4", "lab.eval_per_class=2", "lab.student_steps=[1]",
           "lab.teacher_steps=2", "trainer.progress_bar=false"]


def _table(path):
    return [(r["model"], r["steps"], r["scheduler"]) for r in csv.DictReader(open(path))]



def test_discriminator_step_renoises_real_and_fake_with_their_own_noise(world, monkeypatch):
    from hsd.diffusion.schedule import NoiseSchedule
    teacher = load_teacher(teacher_path("blocks"))
    L.seed_everything(0, verbose=False)
    Adapters(teacher.unet).attach(TSCD, 4, 4)
    cfg = _tscd_cfg("tscd.stages=[{k: 1, grid_steps: 4, iterations: 1, w_adv: 0.5}]", "tscd.adv.hidden=16",
                    "tscd.adv.up_features=true", "tscd.adv.conditioned=true")
    disc = FeatureDiscriminator(feature_channels(teacher.unet, up=True), 16, conditioned=True)
    assert [h.net[2].in_channels for h in disc.heads] == [2 * c for c in (32, 64, 64, 64, 32)]
    m = TSCDModule(teacher.unet, SCHED, cfg.stages[0], cfg, seed=2, disc=disc)
    calls, starts = [], []
    renoise = NoiseSchedule.renoise

    def recording_renoise(sched, x, t_from, t_to, z):
        calls.append(SimpleNamespace(x=x, t_from=t_from.clone(), t_to=t_to.clone(), z=z.clone()))
        return renoise(sched, x, t_from, t_to, z)
    monkeypatch.setattr(NoiseSchedule, "renoise", recording_renoise)
    forward = disc.forward
    monkeypatch.setattr(disc, "forward", lambda feats, start=None: starts.append(start) or forward(feats, start))
    heads = {n: p.detach().clone() for n, p in disc.named_parameters()}
    lora = {n: p.detach().clone() for n, p in m.adapters.params(TSCD).items()}
    emb = teacher.encode(world.prompts + [""])
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(m, datamodule=LabData(world, emb[:-1], emb[-1:], 4, 1))
    assert trainer.global_step == 2  # one generator and one discriminator step
    gen_fake, real, fake = calls  # G's adversarial term, then D's real and fake
    assert gen_fake.x.requires_grad and not fake.x.requires_grad and not real.x.requires_grad
    assert not torch.equal(real.z, fake.z)  # independent noise for real and fake
    assert torch.equal(gen_fake.z, fake.z)  # the fake sample is re-noised the same way for G and D
    for c in (real, fake):
        assert torch.equal(c.t_to, gen_fake.t_to) and torch.equal(c.t_from, gen_fake.t_from)  # one t_adv
    assert (gen_fake.t_to >= gen_fake.t_from).all() and (gen_fake.t_to <= gen_fake.t_from.clamp(min=499)).all()
    # conditioned: both passes see the start point's features (D's batch is [real; fake], the start twice)
    assert len(starts) == 2 and all(s is not None and len(s) == 5 for s in starts)
    for s_g, s_d in zip(*starts):
        assert s_g.shape[0] == 4 and torch.equal(s_d, torch.cat([s_g, s_g]))
    assert any(not torch.equal(p, heads[n]) for n, p in disc.named_parameters())
    assert any(not torch.equal(p, lora[n]) for n, p in m.adapters.params(TSCD).items())
    assert all(torch.isfinite(v) for k, v in trainer.callback_metrics.items() if "loss" in k)


# ---- 6. DMD ----
DMD = ["dmd.batch_size=4", "dmd.lr=1e-3", "dmd.fake_lr=1e-3", "trainer.progress_bar=false",
       "tscd.stages=[{k: 1, grid_steps: 4, iterations: 1}]"]


def _dmd(*over, consistency=True):
    teacher = load_teacher(teacher_path("blocks"))
    L.seed_everything(0, verbose=False)
    lio.attach_lora(teacher.unet, 4, 4)
    with torch.no_grad():
        for n, p in lio.lora_params(teacher.unet, "default").items():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    lio.add_adapter(teacher.unet, "fake", 4, 4)
    cfg = load_config([], [*DMD, *over])
    pair = ConsistencyPair(SCHED, 1, 4, cfg.tscd) if consistency else None
    return teacher, DMDModule(teacher.unet, SCHED, cfg.dmd, None, seed=3, consistency=pair)


def _fit(world, teacher, module, batches):
    emb = teacher.encode(world.prompts + [""])
    trainer = L.Trainer(max_steps=batches * module.steps_per_update, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=LabData(world, emb[:-1], emb[-1:], 4, batches))
    return trainer


def test_dmd_fake_updates_use_fresh_samples_and_every_timestep(world, monkeypatch):
    teacher, m = _dmd("dmd.fake_updates=3", "dmd.t_min=0.5", "dmd.t_max=0.6", "dmd.w_consistency=0.5")
    gens, draws, where = [], [], ["generator"]
    generate, noised, scores, fake_update = (DMDModule.generate, DMDModule.noised, DMDModule.scores,
                                             DMDModule._fake_update)

    def rec_generate(self, z, cond):
        gens.append((z.clone(), torch.is_grad_enabled()))
        return generate(self, z, cond)

    def rec_noised(self, *a, **kw):
        out = noised(self, *a, **kw)
        draws.append((where[-1], out[1].clone()))
        return out

    def labelled(fn, label):
        def wrapped(self, *a, **kw):
            where.append(label)
            try:
                return fn(self, *a, **kw)
            finally:
                where.pop()
        return wrapped
    monkeypatch.setattr(DMDModule, "generate", rec_generate)
    monkeypatch.setattr(DMDModule, "noised", rec_noised)
    monkeypatch.setattr(DMDModule, "scores", labelled(scores, "dmd"))
    monkeypatch.setattr(DMDModule, "_fake_update", labelled(fake_update, "fake"))
    trainer = _fit(world, teacher, m, 2)
    assert trainer.global_step == 8  # per batch: 1 generator + 3 fake-score steps
    assert len(gens) == 8
    for step in (gens[:4], gens[4:]):
        assert [grad for _, grad in step] == [True, False, False, False]  # the generator's own sample has grad
        zs = [z for z, _ in step]
        assert all(not torch.equal(zs[i], zs[j]) for i in range(4) for j in range(i + 1, 4))  # 1 + 3 fresh z
    dmd_t = torch.cat([t for w, t in draws if w == "dmd"])
    fake_t = torch.cat([t for w, t in draws if w == "fake"])
    assert len(dmd_t) == 2 * 4 and len(fake_t) == 2 * 3 * 4
    assert ((dmd_t >= 499) & (dmd_t <= 599)).all(), dmd_t  # [t_min, t_max] * (T - 1)
    assert ((fake_t >= 0) & (fake_t <= 999)).all()
    assert (fake_t < 499).any() and (fake_t > 600).any(), fake_t  # the fake score learns every noise level
    metrics = trainer.callback_metrics
    assert metrics["train/dmd_consistency"] > 0
    torch.testing.assert_close(metrics["train/dmd_loss"], metrics["train/dmd_dmd"] + metrics["train/dmd_consistency"])


def test_dmd_consistency_term_trains_the_generator_and_is_absent_at_weight_zero(world):
    teacher, m = _dmd("dmd.w_consistency=0.5")
    emb = teacher.encode(world.prompts + [""])
    batch = LabData(world, emb[:-1], emb[-1:], 4, 1).make_batch(0)
    loss = m.consistency_loss(batch, torch.Generator().manual_seed(0))
    assert loss > 0
    loss.backward()
    gen = lio.lora_params(teacher.unet, "default")
    assert all(p.grad is not None for p in gen.values()) and sum(p.grad.abs().sum() for p in gen.values()) > 0
    assert all(p.grad is None for p in lio.lora_params(teacher.unet, "fake").values())
    assert all(p.grad is None for n, p in teacher.unet.named_parameters() if "lora_" not in n)
    teacher, m = _dmd("dmd.w_consistency=0")  # a pair is given, but its weight is 0
    metrics = _fit(world, teacher, m, 1).callback_metrics
    assert "train/dmd_dmd" in metrics and "train/dmd_consistency" not in metrics
    torch.testing.assert_close(metrics["train/dmd_loss"], metrics["train/dmd_dmd"])


# ---- 7. the instance term ----
class FakeCoco:
    def __init__(self, n=5):
        self.n = n

    def __len__(self):
        return self.n

    def sample(self, i, size):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, size, size, generator=g), {"image": i}

    def caption(self, i, g):
        return f"a caption of image {i}"


class FakeDecoder(torch.nn.Module):
    LEVEL = 10.0

    def __init__(self):
        super().__init__()
        self.encoded = []

    def encode(self, pixels, g):
        self.encoded.append(pixels)
        return torch.full((pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8), self.LEVEL)

    def forward(self, latents):
        return torch.sigmoid(latents.mean(1, keepdim=True).repeat_interleave(8, 2).repeat_interleave(8, 3))


class FakeStudent:
    def __init__(self, refl):
        self.schedule, self.refl = SCHED, refl
        self.weight = torch.nn.Parameter(torch.tensor(0.5))
        self.eps_calls, self.denoise_calls = [], []

    def student_out(self, x, t, cond):
        self.eps_calls.append(SimpleNamespace(x=x.clone(), t=t.clone(), cond=cond, grad=torch.is_grad_enabled()))
        return 0.1 * x

    def denoise(self, x_t, t, cond):
        self.denoise_calls.append(SimpleNamespace(t=t.clone(), cond=cond, grad=torch.is_grad_enabled()))
        return x_t * self.weight


@pytest.mark.parametrize("start, t_range, eps_ts, stop", [
    (600, [0, 300], [499], 249),        # t_a = 499, the grid step at or below 600
    (800, [0, 300], [749, 499], 249),   # t_a = 749, two steps without gradient
    (999, [900, 999], [], 999),         # t_a = 999 = the only stop: x'_0 straight from x_ta
    (499, [400, 600], [], 499),         # t_a on a grid step is that step
    (499, [600, 800], [], 499),         # a stop above t_a (749) is never used: x'_0 from x_ta itself
    (999, [0, 300], [999, 749, 499], 249),  # the whole grid without gradient, then x'_0 at 249
])
def test_instance_term_diffuses_coco_to_t_a_and_denoises_along_the_refl_grid(start, t_range, eps_ts, stop):
    refl = Refl(1000, 4, t_range)
    assert refl.grid.tolist() == [999, 749, 499, 249]
    student, decoder, texts, losses = FakeStudent(refl), FakeDecoder(), [], []
    cond = torch.randn(3, 5, 16)

    def text(captions, target_size):
        texts.append((list(captions), target_size))
        return cond

    class Loss(torch.nn.Module):
        def forward(self, images, instances):
            losses.append((images, instances))
            return images.mean()
    term = InstanceTerm(FakeCoco(), Loss(), decoder, 64, text, start)
    g = torch.Generator().manual_seed(7)
    picks = torch.randint(5, (3,), generator=torch.Generator().manual_seed(7)).tolist()  # its first draw
    out = term(student, refl, 3, g, "cpu")
    assert texts == [([f"a caption of image {i}" for i in picks], (64, 64))]
    px = decoder.encoded[0]
    assert px.shape == (3, 3, 64, 64) and 0 <= px.min() and px.max() <= 1
    assert [int(c.t[0]) for c in student.eps_calls] == eps_ts
    assert all(not c.grad and c.cond is cond and (c.t == c.t[0]).all() for c in student.eps_calls)
    (d,) = student.denoise_calls
    assert d.grad and d.cond is cond and (d.t == stop).all()
    (images, instances), = losses
    assert images.shape == (3, 1, 64, 64) and instances == [{"image": i} for i in picks]
    out.backward()
    assert student.weight.grad is not None and student.weight.grad != 0  # gradient through x'_0 only


def test_instance_term_noise_level_matches_t_a():
    """x_ta with clean latents at LEVEL: its mean is a_{t_a} LEVEL (noise averages out), whatever t_a is."""
    for start, t_a in [(600, 499), (800, 749), (300, 249)]:
        refl = Refl(1000, 4, [t_a, t_a])  # the only stop is t_a: denoise sees x_ta itself
        student = FakeStudent(refl)
        seen = []
        student.denoise = lambda x_t, t, cond: seen.append(x_t.clone()) or x_t * student.weight
        term = InstanceTerm(FakeCoco(), lambda images, inst: images.mean(), FakeDecoder(), 64,
                            lambda c, target_size: torch.zeros(2, 5, 16), start)
        term(student, refl, 2, torch.Generator().manual_seed(0), "cpu")
        a, s = SCHED.coeffs(torch.tensor([t_a]), seen[0])
        assert not student.eps_calls
        assert abs(float(seen[0].mean()) - float(a) * FakeDecoder.LEVEL) < 4 * float(s) / seen[0].numel() ** 0.5
        x0 = torch.full_like(seen[0], FakeDecoder.LEVEL)
        noise = (seen[0] - a * x0) / s
        assert 0.7 < float(noise.std()) < 1.3  # unit Gaussian noise at exactly t_a's level
        torch.testing.assert_close(add_noise(x0, noise, a, s), seen[0])


# ---- 8. the lab table of a CFG-preserving LoRA ----
def test_cfg_preserving_run_adds_guided_rows_to_the_lab_table(tmp_path, monkeypatch):
    import hsd.lit.consistency as consistency
    from hsd.train import run
    emptied = []
    original = consistency.with_empty_prompts
    monkeypatch.setattr(consistency, "with_empty_prompts",
                        lambda c, u, e: emptied.append(e.clone()) or original(c, u, e))
    monkeypatch.setattr(consistency, "teacher_step", lambda *a, **k: pytest.fail("CFG teacher step with cfg_solver "
                                                                                 "= false"))
    cfg = load_config([], [*LAB_RUN, "tscd.cfg_solver=false", "tscd.empty_prompts=0.1", f"out_dir={tmp_path}",
                           "name=cfg", "tscd.stages=[{k: 1, grid_steps: 2, iterations: 2}]"])
    run(cfg)
    assert len(emptied) == 2 and all(e.shape == (4,) for e in emptied)  # every batch draws its empty prompts
    rows = list(csv.DictReader(open(tmp_path / "cfg" / "table.csv")))
    stage = {r["scheduler"]: r for r in rows if r["model"] == "TSCD stage k=1"}
    assert set(stage) == {"DDIM trailing", "DDIM trailing, CFG 3"}
    assert all(r["steps"] == "1" for r in stage.values())
    plain, guided = stage["DDIM trailing"], stage["DDIM trailing, CFG 3"]
    assert plain["swd_ode"] != guided["swd_ode"] and plain["traj_err"] != guided["traj_err"]  # CFG changes samples
    assert ("TSCD final (k=1)", "1", "TCD eta=0.3") in _table(tmp_path / "cfg" / "table.csv")
