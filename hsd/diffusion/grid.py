"""The DDIM "trailing" timestep grid in plain Python (no torch), so configs can check it before anything loads."""
from __future__ import annotations


def trailing(T: int, N: int) -> list[int]:
    """The N-step trailing grid, ascending: round(j T / N) - 1 for j = 1..N, rounded exactly (half to even).

    Exact rationals make the grid of N and that of a divisor k of N agree point for point. diffusers' DDIM computes
    T - j T / N in floating point and differs from it at a few points for some N (48: 186 where exact gives 187, at
    four points); at the step counts LoRAs are sampled with (1, 2, 4, 8, 12) the two agree (tests/test_diffusion.py).
    """
    if not 1 <= N <= T:
        raise ValueError(f"grid steps N={N} must be in [1, {T}]")
    return [_round_half_even(j * T, N) - 1 for j in range(1, N + 1)]


def _round_half_even(num: int, den: int) -> int:
    q, r = divmod(num, den)
    return q + (2 * r > den or (2 * r == den and q % 2 == 1))


def off_grid(T: int, k: int, N: int) -> list[int]:
    """The k-step DDIM-trailing inference timesteps that are not points of the N-step training grid (descending).

    Empty exactly when N is a multiple of k: then every timestep the stage-k LoRA is sampled at was trained on.
    With N = 50 and k = 8, six of the eight (874, 749, 624, 374, 249, 124) fall between grid points.
    """
    on = set(trailing(T, N))
    return [t for t in reversed(trailing(T, k)) if t not in on]
