"""The flow-matching family of hsd.diffusion.schedule, checked against diffusers' FlowMatchEulerDiscreteScheduler as
an oracle (SD3's static shift, FLUX's dynamic one), and the family-agnostic pieces (CFG, the guided step, re-noising,
the denoising target) checked on both families."""
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from hsd.diffusion.schedule import NoiseSchedule, flow_sigmas, flux_mu
from hsd.diffusion.segments import inference_timesteps, sample_times, ddim_grid
from hsd.diffusion.solvers import cfg, teacher_step

SD3 = dict(shift=3.0)  # SD3 / SD3.5 scheduler_config.json
FLUX = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)  # FLUX.1-dev scheduler_config.json


def _full(v, n=2):
    return torch.full((n,), v, dtype=torch.long)


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_mu_is_fluxs(tokens):
    assert flux_mu(tokens) == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), abs=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_sigmas_and_timesteps_are_diffusers(shift):
    """Index t carries diffusers' training sigma of t + 1: its sigmas are in descending order, ours ascending, and
    the network is given diffusers' timesteps (T * sigma)."""
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = NoiseSchedule.from_scheduler(sch)
    t = torch.arange(1000)
    torch.testing.assert_close(ours.lookup(t).float(), sch.sigmas.flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.model_time(t), sch.timesteps.flip(0), atol=2e-4, rtol=0)
    assert ours.family == "flow" and ours.lookup(_full(-1)).tolist() == [0.0, 0.0]  # past the last step: clean


def test_noising_is_diffusers_scale_noise():
    sch = FlowMatchEulerDiscreteScheduler(**SD3)
    ours = NoiseSchedule.from_scheduler(sch)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ref = sch.scale_noise(x0, sch.timesteps.flip(0)[t], eps)
    torch.testing.assert_close(ours.noise(x0, eps, t), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.noise(x0, eps, _full(999, 3)), eps)  # sigma 1: pure noise


@pytest.mark.parametrize("config,tokens", [(SD3, None), (FLUX, 4096), (FLUX, 1024)])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_k_step_euler_sampling_is_diffusers(config, tokens, steps):
    """The k-step trailing indices carry the sigmas of linspace(1, 1/k, k) shifted (FLUX's pipeline default,
    and what hsd passes to SD3's), and the jump between them is diffusers' Euler step."""
    sch = FlowMatchEulerDiscreteScheduler(**config)
    ours = NoiseSchedule.from_scheduler(sch, image_tokens=tokens)
    mu = flux_mu(tokens) if tokens else None
    sch.set_timesteps(sigmas=[(steps - j) / steps for j in range(steps)], mu=mu)
    ts = [*inference_timesteps(1000, steps).tolist(), -1]
    torch.testing.assert_close(ours.lookup(torch.tensor(ts)).float(), sch.sigmas, atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        ref = sch.step(v, sch.timesteps[i], x).prev_sample.double()
        x_ours = ours.jump(x, v, _full(t), _full(s))
        torch.testing.assert_close(x_ours, ref, atol=1e-5, rtol=0)  # diffusers steps in float32
        x = ref


def test_from_scheduler_refuses_what_it_does_not_model():
    with pytest.raises(ValueError, match="token count"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX))
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True))
    with pytest.raises(ValueError, match="time_shift_type=linear"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(time_shift_type="linear"))


def _families():
    vp = NoiseSchedule.from_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                    beta_end=0.012, set_alpha_to_one=True))
    return {"vp": vp, "flow": NoiseSchedule.flow(flow_sigmas(1000, 3.0))}


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_split_inverts_noising_and_the_target_is_the_networks_parametrisation(family):
    """A network output equal to the target of (x0, eps) implies exactly (x0, eps) back; the jump to s lands on the
    noising of the same (x0, eps) at s (the deterministic path is exact for a perfect network)."""
    sch = _families()[family]
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, s = torch.tensor([10, 400, 900, 998]), torch.tensor([-1, 100, 899, 500])
    x_t = sch.noise(x0, eps, t)
    out = sch.target(x0, eps)
    x0_hat, eps_hat = sch.split(x_t, out, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(sch.jump(x_t, out, t, s), sch.noise(x0, eps, s))
    if family == "flow":
        sig = sch.lookup(t).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(out, eps - x0)
        torch.testing.assert_close(sch.jump(x_t, out, t, s), x_t + (sch.lookup(s).reshape(-1, 1, 1, 1) - sig) * out)


def test_flow_x0_is_finite_at_pure_noise():
    """At sigma = 1 (a = 0) the velocity still gives x0 = x_t - v: nothing divides by a."""
    sch = _families()["flow"]
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(sch.x0(x, v, _full(999)), x - v)


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_renoise_composes_the_forward_process(family):
    """x_from = a_f x0 + s_f e, then renoise to t_to: the x0 coefficient is a_to and the noise variance s_to^2."""
    sch = _families()[family]
    t_from, t_to = torch.tensor([0, 200, 700, 998]), torch.tensor([10, 600, 700, 999])
    like = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    (a_f, s_f), (a_t, s_t) = sch.coeffs(t_from, like), sch.coeffs(t_to, like)
    one, zero = torch.ones_like(like), torch.zeros_like(like)
    r = sch.renoise(one, t_from, t_to, zero)  # the coefficient on x_from
    std = sch.renoise(zero, t_from, t_to, one)  # the fresh noise's std
    torch.testing.assert_close(r * a_f, a_t)
    torch.testing.assert_close(r ** 2 * s_f ** 2 + std ** 2, s_t ** 2)


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_guiding_the_output_guides_x0_with_the_same_weight(family):
    """CFG on the network output (velocity or eps) is CFG on the x0 it implies: the guided step is family-agnostic."""
    sch = _families()[family]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out_u, out_c = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t, s, w = torch.tensor([999, 600]), torch.tensor([500, -1]), 3.5
    net = lambda x_, t_, c: torch.cat([out_u, out_c]) if c.shape[0] == 4 else None  # noqa: E731
    cond, uncond = torch.ones(2, 1), torch.zeros(2, 1)
    stepped = teacher_step(sch, net, x, t, s, cond, uncond, w)
    x0_u, x0_c = sch.x0(x, out_u, t), sch.x0(x, out_c, t)
    x0_g = cfg(x0_u, x0_c, w)
    assert torch.allclose(sch.x0(x, cfg(out_u, out_c, w), t), x0_g, atol=1e-10)
    assert torch.allclose(stepped, sch.jump(x, cfg(out_u, out_c, w), t, s))


def test_segments_and_k_step_sigmas_align_on_the_flow_grid():
    """TSCD's segments (Eq. 13) and the k-step sampler live on the same integer grid for both families: every
    k-step timestep is a point of the N-step training grid when k divides N, so every sigma the stage-k LoRA is
    sampled at was trained on, and t_end stays inside its segment."""
    sch = _families()["flow"]
    for N, k in [(48, 8), (48, 4), (32, 2), (32, 1)]:
        grid = set(ddim_grid(1000, N).tolist())
        assert set(inference_timesteps(1000, k).tolist()) <= grid
        ts = sample_times(ddim_grid(1000, N), k, 1000, 256, torch.Generator().manual_seed(k))
        assert ((ts.t_end >= ts.t_b) & (ts.t_end <= ts.t_prev) & (ts.t_prev < ts.t_n)).all()
        assert (sch.lookup(ts.t_end) <= sch.lookup(ts.t_n)).all()  # t_end is never noisier than t_n
