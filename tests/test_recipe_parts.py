"""Issue 14's training parts, each on its own: the shared consistency pair (CFG-preserving teacher step, empty
prompts, previous-stage teacher) and the EMA target. The stage parts are in test_recipe_stages.py."""
import csv

import lightning as L
import pytest
import torch
from recipe_common import SCHED, B, _pair, _run_pair, _tensor_batch, _tscd_cfg
from safetensors.torch import load_file

from hsd.config import load_config
from hsd.diffusion.solvers import cfg as apply_cfg
from hsd.lab.teacher import load_teacher, teacher_path
from hsd.lit.consistency import with_empty_prompts
from hsd.lit.tscd import TSCDModule
from hsd.models import lora as lio
from hsd.models.adapters import PREVIOUS, TSCD, Adapters
from hsd.models.adapters import add as add_adapter
from hsd.models.ema import EMA
from hsd.worlds.lab import LabData


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---- 1. the teacher's step: CFG or not ----
@pytest.mark.parametrize("cfg_solver, guided, cfg_rows", [("false", True, False), ("true", True, True),
                                                          ("true", False, False)])
def test_pair_applies_cfg_only_with_the_cfg_solver_and_a_base_teacher(cfg_solver, guided, cfg_rows):
    batch = _tensor_batch()
    pair = _pair(f"tscd.cfg_solver={cfg_solver}", guided=guided)
    assert pair.guided is cfg_rows
    (pred, tgt, aux), student, teacher, target = _run_pair(pair, batch)
    assert len(student.calls) == len(teacher.calls) == len(target.calls) == 1
    s, te, ta = student.calls[0], teacher.calls[0], target.calls[0]
    assert s.x.shape[0] == ta.x.shape[0] == B and te.x.shape[0] == (2 * B if cfg_rows else B)
    assert s.grad and not te.grad and not ta.grad  # only the student's prediction carries gradient
    t_n, t_prev, t_end, x_tn, w = aux["t_n"], aux["t_prev"], aux["t_end"], aux["x_tn"], aux["w"]
    assert torch.equal(s.t, t_n) and torch.equal(s.x, x_tn) and torch.equal(ta.t, t_prev)
    f = teacher.fn
    if cfg_rows:  # [uncond; cond] in one batched forward, then eps_u + w (eps_c - eps_u)
        assert torch.equal(te.t, torch.cat([t_n, t_n])) and torch.equal(te.x, torch.cat([x_tn, x_tn]))
        assert torch.equal(te.cond, torch.cat([batch["uncond"], batch["cond"]]))
        assert ((w >= 2.5) & (w <= 3.5)).all()
        eps = apply_cfg(f(x_tn, t_n, batch["uncond"]), f(x_tn, t_n, batch["cond"]), w)
    else:  # the conditional teacher alone
        assert torch.equal(te.t, t_n) and torch.equal(te.x, x_tn) and torch.equal(te.cond, batch["cond"])
        eps = f(x_tn, t_n, batch["cond"])
    x_prev = SCHED.jump(x_tn, eps, t_n, t_prev)
    torch.testing.assert_close(ta.x, x_prev, rtol=1e-5, atol=1e-5)  # the target starts where the teacher landed
    torch.testing.assert_close(tgt, SCHED.jump(x_prev, target.fn(x_prev, t_prev, batch["cond"]), t_prev,
                                              t_end), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred, SCHED.jump(x_tn, student.fn(x_tn, t_n, batch["cond"]), t_n, t_end))
    # the CFG and the plain teacher land on different points: the switch matters
    (_, other, _), *_ = _run_pair(_pair(f"tscd.cfg_solver={'false' if cfg_rows else 'true'}"), batch)
    assert (other - tgt).abs().max() > 1e-3


# ---- 2. empty prompts ----
def _empty_rows(cond, uncond):
    return (cond == uncond.expand_as(cond)).flatten(1).all(1)


@pytest.mark.parametrize("cfg_solver", ["false", "true"])
def test_empty_prompts_replace_that_fraction_of_conds_for_all_three_networks(cfg_solver):
    for p, lo, hi in [(1.0, 256, 256), (0.0, 0, 0), (0.5, 96, 160)]:  # 0.5: 128 +- 4 binomial SDs (8)
        batch = _tensor_batch(256, seed=1)
        (_, _, aux), student, teacher, target = _run_pair(_pair(f"tscd.cfg_solver={cfg_solver}",
                                                                f"tscd.empty_prompts={p}"), batch)
        seen = student.calls[0].cond
        empty = _empty_rows(seen, batch["uncond"])
        assert lo <= int(empty.sum()) <= hi, (p, int(empty.sum()))
        assert torch.equal(seen[~empty], batch["cond"][~empty])  # the rest keep their own prompt
        te = teacher.calls[0].cond[-256:]  # with CFG: [uncond; cond]; the cond half is replaced the same way
        assert torch.equal(te, seen) and torch.equal(target.calls[0].cond, seen) and torch.equal(aux["cond"], seen)


def _sdxl(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(n, 7, 12, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(n, 10, generator=g),
                                  "time_ids": torch.randn(n, 6, generator=g)}}


def _leaves(cond, prefix=""):
    if isinstance(cond, dict):
        return {k: v for key in cond for k, v in _leaves(cond[key], f"{prefix}{key}.").items()}
    return {prefix[:-1]: cond}


def test_empty_prompts_work_on_sdxl_dict_conds():
    cond, uncond = _sdxl(4, 0), _sdxl(4, 1)
    mask = torch.tensor([True, False, True, False])
    out = _leaves(with_empty_prompts(cond, uncond, mask))
    c, u = _leaves(cond), _leaves(uncond)
    assert set(out) == {"encoder_hidden_states", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"}
    for k in out:
        assert torch.equal(out[k][mask], u[k][mask]) and torch.equal(out[k][~mask], c[k][~mask]), k
    one = with_empty_prompts(cond, {k: v[:1] if not isinstance(v, dict) else {j: w[:1] for j, w in v.items()}
                                    for k, v in uncond.items()}, torch.ones(4, dtype=torch.bool))
    assert all(torch.equal(v, u[k][:1].expand_as(v)) for k, v in _leaves(one).items())  # a 1-row uncond broadcasts
    # through the pair, with CFG (cat_cond of dicts): every network sees the empty prompt's dict at 1.0
    batch = {"x0": torch.randn(4, 3, 8, 8), "cond": cond, "uncond": uncond}
    _, student, teacher, target = _run_pair(_pair("tscd.empty_prompts=1.0"), batch)
    te = _leaves(teacher.calls[0].cond)
    for k, v in _leaves(student.calls[0].cond).items():
        assert torch.equal(v, u[k]) and torch.equal(_leaves(target.calls[0].cond)[k], u[k])
        assert torch.equal(te[k], torch.cat([u[k], u[k]]))


# ---- 3. the previous stage's LoRA as the teacher ----
def _two_adapter_teacher():
    teacher = load_teacher(teacher_path("blocks"))
    L.seed_everything(0, verbose=False)
    Adapters(teacher.unet).attach(TSCD, 4, 4)
    add_adapter(teacher.unet, PREVIOUS, 4, 4)
    with torch.no_grad():
        for n, p in lio.lora_params(teacher.unet).items():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return teacher


def test_previous_teacher_is_the_previous_adapter_alone(world):
    teacher = _two_adapter_teacher()
    unet, cfg = teacher.unet, _tscd_cfg("tscd.cfg_solver=true")
    emb = teacher.encode(world.prompts + [""])
    x, t, cond = torch.randn(4, 3, 8, 8), torch.tensor([999, 749, 499, 249]), emb[:4]

    def out(fused):
        with torch.no_grad():
            return lio.plain_unet(unet, fused)(x, t, encoder_hidden_states=cond).sample
    base, prev, student = out(None), out({PREVIOUS: 1.0}), out({TSCD: 1.0})
    assert (prev - base).abs().max() > 1e-3 and (prev - student).abs().max() > 1e-3
    m = TSCDModule(unet, SCHED, cfg.stages[0], cfg, previous=True)
    with torch.no_grad():
        torch.testing.assert_close(m.teacher_out(x, t, cond), prev, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.student_out(x, t, cond), student, rtol=1e-4, atol=1e-5)  # state put back
    assert not m.pair.guided  # guidance is folded into a distilled stage: no CFG even with the CFG solver
    # the pair's gradient reaches the student's LoRA only, never the frozen previous one
    batch = LabData(world, emb[:-1], emb[-1:], 4, 1).make_batch(0)
    pred, target, _ = m.tscd_pair(batch, torch.Generator().manual_seed(0))
    ((pred - target) ** 2).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in lio.lora_params(unet, PREVIOUS).values())
    assert sum(p.grad.abs().sum() for p in lio.lora_params(unet, TSCD).values()) > 0
    m = TSCDModule(unet, SCHED, cfg.stages[0], cfg, previous=False)
    with torch.no_grad():
        torch.testing.assert_close(m.teacher_out(x, t, cond), base, rtol=1e-4, atol=1e-5)
    assert m.pair.guided


LAB_RUN = ["lab.world=blocks", "tscd.batch_size=4", "lab.eval_per_class=2", "lab.student_steps=[1]",
           "lab.teacher_steps=2", "trainer.progress_bar=false"]


def _table(path):
    return [(r["model"], r["steps"], r["scheduler"]) for r in csv.DictReader(open(path))]


def test_run_with_previous_teacher_loads_stage0_into_the_previous_adapter(tmp_path, monkeypatch):
    import hsd.train as train
    worlds, built = [], []
    build_world = train.build_world
    monkeypatch.setattr(train, "build_world", lambda cfg: worlds.append(build_world(cfg)) or worlds[-1])

    class Recorded(TSCDModule):
        def __init__(self, *a, **kw):
            built.append(kw["previous"])
            super().__init__(*a, **kw)
    monkeypatch.setattr(train, "TSCDModule", Recorded)
    cfg = load_config([], [*LAB_RUN, "tscd.teacher=previous", f"out_dir={tmp_path}", "name=prev",
                           "tscd.stages=[{k: 2, grid_steps: 4, iterations: 2}, {k: 1, grid_steps: 4, iterations: 2}]"])
    train.run(cfg)
    out = tmp_path / "prev"
    assert built == [False, True]  # stage 0 distils the base model, stage 1 the stage-0 LoRA
    params = Adapters(worlds[0].unet).params(PREVIOUS)
    stage0, stage1 = (load_file(out / f) for f in ("lora_stage0_k2.safetensors", "lora_stage1_k1.safetensors"))
    assert params and len(params) == len(stage0)
    for n, p in params.items():
        assert torch.equal(p.detach(), stage0["unet." + n.replace(f".{PREVIOUS}.", ".")]), n
    assert sum(v.abs().sum() for k, v in stage0.items() if "lora_B" in k) > 0  # stage 0 did train
    assert any(not torch.equal(stage0[k], stage1[k]) for k in stage0)  # and stage 1 trained on from it
    # a later stage reloads the (already attached) previous adapter with its own predecessor's file
    adapters = Adapters(worlds[0].unet)
    tscd_before = {n: p.detach().clone() for n, p in adapters.params(TSCD).items()}
    train._load_previous(cfg, adapters, out / "lora_stage1_k1.safetensors")
    for n, p in adapters.params(PREVIOUS).items():
        assert torch.equal(p.detach(), stage1["unet." + n.replace(f".{PREVIOUS}.", ".")]), n
    assert all(torch.equal(p, tscd_before[n]) for n, p in adapters.params(TSCD).items())
    rows = _table(out / "table.csv")
    assert ("TSCD stage k=2", "2", "DDIM trailing") in rows and ("TSCD stage k=1", "1", "DDIM trailing") in rows
    assert not any(m.startswith("TSCD stage") and "CFG" in s for m, _, s in rows)  # cfg_solver on: no guided rows


# ---- 4. EMA ----
def test_ema_decay_zero_is_the_online_target(world):
    teacher = load_teacher(teacher_path("blocks"))
    L.seed_everything(0, verbose=False)
    Adapters(teacher.unet).attach(TSCD, 4, 4)
    cfg = _tscd_cfg("tscd.ema_decay=0", "tscd.lr=1e-2")
    m = TSCDModule(teacher.unet, SCHED, cfg.stages[0], cfg, seed=1)
    live = m.adapters.params(TSCD)
    before = {n: p.detach().clone() for n, p in live.items()}
    emb = teacher.encode(world.prompts + [""])
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(m, datamodule=LabData(world, emb[:-1], emb[-1:], 4, 1))
    assert any(not torch.equal(p, before[n]) for n, p in live.items())  # the LoRA moved...
    assert all(torch.equal(m.ema.tensors()[n], p.detach()) for n, p in live.items())  # ...and the EMA is it
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([999, 500, 250, 10])
    with torch.no_grad():
        torch.testing.assert_close(m.ema_out(x, t, emb[:4]), m.student_out(x, t, emb[:4]))


def test_ema_of_lora_factors_is_not_the_ema_of_their_product():
    g = torch.Generator().manual_seed(0)
    A, Bm = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    d = 0.5
    ema = EMA({"A": A, "B": Bm, "BA": Bm @ A})
    A1, B1 = torch.randn_like(A), torch.randn_like(Bm)
    ema.update({"A": A1, "B": B1, "BA": B1 @ A1}, d)
    e = ema.tensors()
    # one update: EMA(B) EMA(A) - EMA(BA) = -d (1 - d) (B0 - B1)(A0 - A1), exactly
    torch.testing.assert_close(e["B"] @ e["A"] - e["BA"], -d * (1 - d) * (Bm - B1) @ (A - A1))
    for _ in range(3):
        A1, B1 = torch.randn_like(A), torch.randn_like(Bm)
        ema.update({"A": A1, "B": B1, "BA": B1 @ A1}, d)
    e = ema.tensors()
    gap = (e["B"] @ e["A"] - e["BA"]).abs().max() / e["BA"].abs().max()
    assert gap > 0.05, float(gap)  # the averaged factors make another LoRA than the averaged delta
    ema.update({"A": A1, "B": B1, "BA": B1 @ A1}, 0.0)  # decay 0: both are the live LoRA
    e = ema.tensors()
    torch.testing.assert_close(e["B"] @ e["A"], e["BA"])


# ---- 5. the discriminator ----
