"""The process math: q, the posterior from Bayes' rule, p_theta, converters, KL and the decoder."""

import math

import numpy as np
import pytest
import torch

from ddpm_core import diffusion as d
from ddpm_core.losses import discretized_gaussian_log_likelihood, l_simple, normal_kl
from ddpm_core.schedules import NoiseSchedule

S = NoiseSchedule.named("linear", 1000)


def test_q_sample_matches_closed_form_moments():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7, dtype=torch.float64)
    t = torch.full((len(x0),), 300, dtype=torch.long)
    x_t = d.q_sample(S, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    abar = S.alphas_cumprod[300]
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=1e-2)
    mean, var, log_var = d.q_mean_variance(S, x0[:1], t[:1])
    assert mean.item() == pytest.approx(math.sqrt(abar) * 0.7) and var.item() == pytest.approx(1 - abar)
    assert log_var.item() == pytest.approx(math.log(1 - abar))


def test_q_of_xt_given_xt_minus_1_composes_to_closed_form():
    """Running the one-step chain x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z gives q(x_t | x_0)."""
    g = torch.Generator().manual_seed(1)
    x = torch.full((100_000,), -0.4, dtype=torch.float64)
    for i in range(50):
        x = math.sqrt(S.alphas[i]) * x + math.sqrt(S.betas[i]) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert x.mean().item() == pytest.approx(S.sqrt_alphas_cumprod[49] * -0.4, abs=3e-3)
    assert x.var().item() == pytest.approx(1 - S.alphas_cumprod[49], rel=3e-2)


@pytest.mark.parametrize("i", [1, 10, 500, 999])
def test_posterior_mean_and_variance_from_bayes_rule(i):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})."""
    x0, x_t = torch.tensor([[[[0.3]]]], dtype=torch.float64), torch.tensor([[[[-1.2]]]], dtype=torch.float64)
    a, b, abar_prev = S.alphas[i], S.betas[i], S.alphas_cumprod_prev[i]
    precision = a / b + 1 / (1 - abar_prev)
    bayes_mean = (math.sqrt(a) / b * -1.2 + math.sqrt(abar_prev) / (1 - abar_prev) * 0.3) / precision
    mean, var, _ = d.q_posterior_mean_variance(S, x0, x_t, torch.tensor([i]))
    assert mean.item() == pytest.approx(bayes_mean, rel=1e-10)
    assert var.item() == pytest.approx(1 / precision, rel=1e-10)


def test_posterior_at_t1_is_x0():
    x0, x_t = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64)
    mean, var, _ = d.q_posterior_mean_variance(S, x0, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0)


def test_parameterization_converters_round_trip():
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(1000, (8,), generator=g)
    x_t = d.q_sample(S, x0, t, eps)
    torch.testing.assert_close(d.x0_from_eps(S, x_t, t, eps), x0)
    torch.testing.assert_close(d.eps_from_x0(S, x_t, t, x0), eps)
    v = d.v_from_eps_x0(S, t, eps, x0)
    torch.testing.assert_close(d.x0_from_v(S, x_t, t, v), x0)
    for objective, out in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(d.x0_from_prediction(S, x_t, t, out, objective), x0)
        torch.testing.assert_close(d.training_target(S, x0, t, eps, objective), out)


def test_fixed_variances():
    t = torch.arange(1000)
    x = torch.zeros(1000, 1, 1, 1, dtype=torch.float64)
    small, log_small = d.p_variance(S, t, x, "fixed_small")
    large, log_large = d.p_variance(S, t, x, "fixed_large")
    np.testing.assert_allclose(small.flatten().numpy(), S.posterior_variance)
    np.testing.assert_allclose(large.flatten()[1:].numpy(), S.betas[1:])
    assert large.flatten()[0].item() == pytest.approx(S.posterior_variance[1])
    assert torch.isfinite(log_small).all() and torch.isfinite(log_large).all()
    assert torch.all(small <= large + 1e-18)
    with pytest.raises(ValueError, match="learned"):
        d.p_variance(S, t, x, "learned")


def test_p_mean_variance_with_true_eps_gives_posterior_mean():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(5, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 100, 600, 999])
    x_t = d.q_sample(S, x0, t, eps)
    p = d.p_mean_variance(lambda x, tt: eps, S, x_t, t)
    mean, _, log_var = d.q_posterior_mean_variance(S, x0, x_t, t)
    torch.testing.assert_close(p["mean"], mean)
    torch.testing.assert_close(p["log_variance"], log_var)
    torch.testing.assert_close(p["pred_eps"], eps)


def test_kl_of_identical_gaussians_is_zero_and_matches_monte_carlo():
    m, lv = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(10, dtype=torch.float64))
    g = torch.Generator().manual_seed(4)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    x = m1 + math.sqrt(0.5) * torch.randn(400_000, generator=g, dtype=torch.float64)
    log_ratio = (-0.5 * (x - m1) ** 2 / 0.5 - 0.5 * lv1) - (-0.5 * (x - m2) ** 2 / 2.0 - 0.5 * lv2)
    closed = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2)))
    assert closed.item() == pytest.approx(log_ratio.mean().item(), abs=5e-3)
    assert closed.item() > 0


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.95, -5.0), (-1.0, 0.0), (0.37, -8.0), (3.0, 1.0)])
def test_decoder_bin_probabilities_sum_to_one(mean, log_scale):
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, log_scale))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9 + 256e-12)


def test_decoder_is_gaussian_mass_of_the_bin():
    x = torch.tensor([0.0 / 127.5], dtype=torch.float64)
    sigma = 0.01
    logp = discretized_gaussian_log_likelihood(x, x.clone(), torch.tensor([math.log(sigma)], dtype=torch.float64))
    expected = math.erf((1 / 255) / sigma / math.sqrt(2))  # 2 Phi(h / sigma) - 1
    assert logp.exp().item() == pytest.approx(expected, rel=1e-12)


def test_l_simple_is_zero_for_the_true_noise_and_per_example():
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 999])
    assert torch.all(l_simple(lambda x, tt: noise, S, x0, t, noise) == 0)
    loss = l_simple(lambda x, tt: torch.zeros_like(x), S, x0, t, noise)
    torch.testing.assert_close(loss, (noise ** 2).mean(dim=(1, 2, 3)))
