import torch
from diffusers import DDIMScheduler

from hsd.diffusion.schedule import NoiseSchedule
from hsd.diffusion.segments import ddim_grid, sample_times, segment_start


def sd_ddim():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")


def test_psi_equals_diffusers_ddim_step():
    sch = sd_ddim()
    sch.set_timesteps(4)
    sched = NoiseSchedule.from_scheduler(sch)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t in sch.timesteps.tolist():
        ref = sch.step(eps.double(), t, x.double()).prev_sample
        ours = sched.jump(x.double(), eps.double(), torch.full((2,), t), torch.full((2,), t - 250))
        assert torch.allclose(ours, ref, atol=1e-5)  # diffusers holds alpha-bar in float32


def test_eq13_boundaries():
    t = torch.tensor([0, 124, 125, 874, 875, 999])
    assert segment_start(t, 8, 1000).tolist() == [0, 0, 125, 750, 875, 875]
    assert segment_start(t, 4, 1000).tolist() == [0, 0, 0, 750, 750, 750]
    assert segment_start(t, 2, 1000).tolist() == [0, 0, 0, 500, 500, 500]
    assert segment_start(t, 1, 1000).tolist() == [0] * 6


def test_t_end_inside_segment_and_below_t_n():
    grid = ddim_grid(1000, 50)
    g = torch.Generator().manual_seed(1)
    for k in (8, 4, 2, 1):
        s = sample_times(grid, k, 1000, 4096, g)
        assert (s.t_end >= s.t_b).all() and (s.t_end <= s.t_prev).all() and (s.t_end < s.t_n).all()
        assert (segment_start(s.t_end, k, 1000) == s.t_b).all()
    cd = sample_times(grid, 1, 1000, 256, g, t_end="boundary")
    assert (cd.t_end == 0).all()
