"""Schedules: definitions, the endpoint policy, float64, errors, and respacing identities."""

import math

import numpy as np
import pytest

from ddpm_core.schedules import (NoiseSchedule, ScheduleError, SCHEDULES, cosine_alphas_cumprod, make_betas,
                                 respace, respaced_indices)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [21, 100, 1000, 4000])
def test_betas_are_valid_float64(name, T):
    b = make_betas(name, T)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert np.all(b > 0) and np.all(b < 1)
    assert np.all(np.diff(b) >= -1e-15), "betas must not decrease"


def test_linear_matches_ho_at_1000_and_scales_with_T():
    np.testing.assert_allclose(make_betas("linear", 1000), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
    b = make_betas("linear", 250)
    assert b[0] == pytest.approx(4e-4) and b[-1] == pytest.approx(0.08)


@pytest.mark.parametrize("name", ["linear", "quadratic", "sigmoid", "cosine"])
def test_every_T_ends_near_pure_noise(name):
    for T in (50, 100, 1000):
        abar_T = np.cumprod(1 - make_betas(name, T))[-1]
        assert abar_T < 1e-2, (name, T, abar_T)


def test_quadratic_is_square_of_linspace_of_roots():
    b = make_betas("quadratic", 1000)
    np.testing.assert_allclose(np.sqrt(b), np.linspace(1e-2, math.sqrt(0.02), 1000), rtol=1e-12)


def test_cosine_definition():
    T = 1000
    b = make_betas("cosine", T)
    assert b[-1] == 0.999
    assert math.sqrt(b[0]) == pytest.approx(0.0064, abs=2e-4)
    abar = cosine_alphas_cumprod(T)
    np.testing.assert_allclose(np.cumprod(1 - b)[:-1], abar[1:-1], rtol=1e-9)


def test_sigmoid_endpoints():
    b = make_betas("sigmoid", 1000)
    assert 1e-4 < b[0] < 2e-4 and 0.0199 < b[-1] < 0.02


@pytest.mark.parametrize("name", ["linear", "quadratic", "sigmoid"])
def test_too_small_T_is_refused_with_the_limit(name):
    with pytest.raises(ScheduleError, match=r"T >= 21.*T=20"):
        make_betas(name, 20)
    make_betas(name, 21)


def test_bad_names_and_T():
    with pytest.raises(ScheduleError, match="unknown schedule 'cubic'"):
        make_betas("cubic", 100)
    with pytest.raises(ScheduleError, match="T=1"):
        make_betas("cosine", 1)
    with pytest.raises(ScheduleError, match="integer"):
        make_betas("cosine", 10.5)


def test_schedule_arrays_follow_definitions():
    s = NoiseSchedule.named("linear", 100)
    assert s.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas))
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == math.log(s.posterior_variance[1])
    assert s.posterior_mean_coef1[0] == pytest.approx(1.0) and s.posterior_mean_coef2[0] == 0.0
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
        assert getattr(s, name).dtype == np.float64
    with pytest.raises(ValueError):
        s.betas[0] = 0.5  # arrays are read-only


def test_posterior_variance_two_ways():
    """beta_tilde = beta (1 - abar_prev)/(1 - abar) = 1 / (alpha/beta + 1/(1 - abar_prev)) for t >= 2."""
    s = NoiseSchedule.named("cosine", 500)
    # Bayes: precision of q(x_{t-1}|x_t,x_0) = precision of q(x_t|x_{t-1}) in x_{t-1} + precision of q(x_{t-1}|x_0)
    np.testing.assert_allclose(s.posterior_variance[1:], 1.0 / (s.alphas[1:] / s.betas[1:]
                                                                + 1.0 / (1.0 - s.alphas_cumprod_prev[1:])),
                               rtol=1e-10)


def test_from_betas_rejects_invalid():
    with pytest.raises(ScheduleError):
        NoiseSchedule.from_betas(np.array([0.1, 1.0]))
    with pytest.raises(ScheduleError):
        NoiseSchedule.from_betas(np.array([0.1]))


@pytest.mark.parametrize("name", SCHEDULES)
def test_respacing_with_K_equal_T_reproduces_betas(name):
    s = NoiseSchedule.named(name, 200)
    r = respace(s, 200)
    np.testing.assert_allclose(r.betas, s.betas, rtol=1e-10, atol=1e-15)
    np.testing.assert_array_equal(r.timestep_map, np.arange(200))


def test_respacing_keeps_abar_at_kept_steps_and_both_ends():
    s = NoiseSchedule.named("linear", 1000)
    for K in (2, 10, 50, 999):
        kept = respaced_indices(1000, K)
        assert len(kept) == K and kept[0] == 0 and kept[-1] == 999 and np.all(np.diff(kept) > 0)
        r = respace(s, K)
        np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-12)
        np.testing.assert_array_equal(r.timestep_map, kept)
    with pytest.raises(ScheduleError, match="between 2 and T=1000"):
        respace(s, 1001)



def _exact_spacing(T: int, K: int) -> tuple[list[int], list[bool]]:
    """The convention written out independently in exact arithmetic: multiples of the stride (T - 1) / (K - 1)
    rounded half to even, and which of them are exact ties (there improved DDPM's float running sum decides)."""
    from fractions import Fraction

    exact = [Fraction(i * (T - 1), K - 1) for i in range(K)]
    return [round(x) for x in exact], [x.denominator == 2 for x in exact]


@pytest.mark.parametrize("T, K, ties", [(1000, 25, {4: 166, 20: 832}), (98, 3, {1: 48})])
def test_respacing_rounds_ties_half_to_even_like_improved_ddpm(T, K, ties):
    """Rounding half up would keep 167 and 833 (T = 1000, K = 25) and 49 (T = 98, K = 3)."""
    kept = respaced_indices(T, K)
    assert kept.tolist() == _exact_spacing(T, K)[0]
    for i, index in ties.items():
        assert kept[i] == index


@pytest.mark.parametrize("T", [21, 50, 98, 100, 1000])
def test_respacing_is_the_nearest_index_to_each_multiple_of_the_stride(T):
    for K in range(2, T + 1):
        kept = respaced_indices(T, K).tolist()
        nearest, tie = _exact_spacing(T, K)
        assert all(k == n or (is_tie and abs(k - n) == 1) for k, n, is_tie in zip(kept, nearest, tie)), K
    # a tie whose stride 49/24 is no binary fraction: the running sum lands just above 24.5 (improved DDPM: 25)
    assert respaced_indices(50, 25)[12] == 25
    # the default sampler (T = 1000, 30 steps) keeps the same indices as the former half-up rounding
    assert respaced_indices(1000, 30).tolist() == [math.floor(i * 999 / 29 + 0.5) for i in range(30)]
