"""The formulas of docs/derivation.md (and .ko.md) that are not plain DDPM, checked against the code that runs them:
the decoder floor and the bound's estimator (section 8), what training calls (section 6), learned variances (10),
the hybrid and vlb losses (11), importance sampling of t in training (12) and Min-SNR weighting (13)."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from ddpm_core import diffusion as d
from ddpm_core.elbo import nll_bpd, prior_bpd, vb_terms_bpd
from ddpm_core.elbo_mc import DEFENSIVE, geometric_edges, log_uniform, shaped_proposal, systematic_draws
from ddpm_core.losses import BIN_HALF_WIDTH as H, discretized_gaussian_log_likelihood, l_simple, normal_kl
from ddpm_core.objectives import HYBRID_LAMBDA_T, min_snr_weight, training_losses
from ddpm_core.resample import UNIFORM_MIX, LossSecondMomentSampler
from ddpm_core.schedules import SCHEDULES, NoiseSchedule
from ddpm_core.stats import grouped_mean_estimate
from ddpm_core.train import TrainConfig, Trainer
from project import ROOT
from tests.helpers import digits_images, tiny_unet
from tests.test_elbo import LN2, one_point

_spec = importlib.util.spec_from_file_location("decoder_floor", ROOT / "scripts" / "decoder_floor.py")
floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floor)

SCHEDULE_GRID = [(name, T) for name in SCHEDULES for T in (50, 1000)]


def code_bits(x: float, mean: float, sigma: float) -> float:
    """-log2 P(x) of one pixel under the decoder the bound uses (losses.discretized_gaussian_log_likelihood)."""
    one = lambda v: torch.tensor([[[[v]]]], dtype=torch.float64)  # noqa: E731
    return -float(discretized_gaussian_log_likelihood(one(x), one(mean), one(math.log(sigma)))) / LN2


# --- section 8: the decoder floor ---------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.002, 0.0039, 0.00738, 0.01, 0.03])
def test_the_floor_formulas_are_the_decoders_probabilities(sigma):
    x = 2 * 100 / 255 - 1  # pixel 100: an interior bin
    assert floor.interior_floor_bits(sigma) == pytest.approx(code_bits(x, x, sigma), rel=1e-9)
    assert floor.edge_bits(sigma) == pytest.approx(code_bits(1.0, 1.0, sigma), rel=1e-9)
    assert floor.edge_bits(sigma) == pytest.approx(code_bits(-1.0, -1.0, sigma), rel=1e-9)
    for k in (0.5, 1.0, 3.0):
        assert floor.interior_bits(sigma, k * H) == pytest.approx(code_bits(x, x + k * H, sigma), rel=1e-9)
        assert floor.interior_bits(sigma, k * H) > floor.interior_floor_bits(sigma)  # the centre is the best mean


def test_the_floor_rises_with_sigma_and_has_the_quoted_values():
    sigmas = np.geomspace(0.001, 0.1, 200)
    bits = np.array([floor.interior_floor_bits(x) for x in sigmas])
    assert np.all(np.diff(bits) > 0)
    quoted = {0.0039: 0.55, 0.0074: 1.31, 0.01: 1.71}  # docs/derivation*.md, section 8
    assert {x: round(floor.interior_floor_bits(x), 2) for x in quoted} == quoted
    s = NoiseSchedule.named("linear", 1000)
    sigma_1 = math.sqrt(s.posterior_variance[1])
    assert sigma_1 / H == pytest.approx(1.88, abs=0.005)  # "about 1.9 times the half-width"
    assert floor.interior_floor_bits(sigma_1) == pytest.approx(1.305, abs=5e-4)
    assert floor.edge_bits(sigma_1) == pytest.approx(0.51, abs=5e-3)


@pytest.mark.parametrize("name,T", SCHEDULE_GRID)
def test_a_learned_sigma_1_lies_between_sqrt_beta_tilde_2_and_sqrt_beta_1(name, T):
    """For v in [-1, 1] the learned sigma_1 can only widen the decoder, so its floor only rises; the code does
    not clamp v, and outside [-1, 1] sigma_1 leaves the range (v = -1.5 goes below sqrt(beta_tilde_2))."""
    s = NoiseSchedule.named(name, T)
    lo, hi = floor.learned_sigma1_range(s)
    assert lo == pytest.approx(math.sqrt(s.posterior_variance[1]), rel=1e-12)
    assert hi == pytest.approx(math.sqrt(s.betas[0]), rel=1e-12)
    assert lo < hi
    v = torch.linspace(-1, 1, 41, dtype=torch.float64).view(-1, 1, 1, 1)
    var, _ = d.learned_range_variance(s, torch.zeros(41, dtype=torch.long), v)
    sigma = var.sqrt().flatten().numpy()
    assert np.all(sigma >= lo * (1 - 1e-12)) and np.all(sigma <= hi * (1 + 1e-12)) and np.all(np.diff(sigma) > 0)
    assert all(floor.interior_floor_bits(x) >= floor.interior_floor_bits(lo) - 1e-12 for x in sigma)
    below, _ = d.learned_range_variance(s, torch.zeros(1, dtype=torch.long), torch.full((1, 1, 1, 1), -1.5))
    assert float(below.sqrt()) < lo


def test_a_wider_decoder_is_cheaper_only_for_means_that_miss():
    """What a learned sigma_1 buys: at linear T = 1000, sqrt(beta_1) beats sqrt(beta_tilde_2) once the mean is off
    by more than 2.26 h (about 1.1 gray levels), and loses below."""
    lo, hi = floor.learned_sigma1_range(NoiseSchedule.named("linear", 1000))
    e = floor.crossover_error(lo, hi)
    assert e / H == pytest.approx(2.26, abs=0.005)
    for k in (0.0, 1.0, 2.0):
        assert floor.interior_bits(hi, k * H) > floor.interior_bits(lo, k * H)
    for k in (2.5, 3.0, 4.0):
        assert floor.interior_bits(hi, k * H) < floor.interior_bits(lo, k * H)


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic"])
def test_the_prior_term_is_the_exact_expression_and_about_abar_over_2ln2(name):
    s = NoiseSchedule.named(name, 1000)
    a = s.alphas_cumprod[-1]
    x0 = (torch.randint(0, 256, (4, 1, 5, 5), generator=torch.Generator().manual_seed(0)).double() / 127.5 - 1)
    exact = (0.5 * (a * x0**2 - a - math.log(1 - a))).mean(dim=(1, 2, 3)) / LN2
    torch.testing.assert_close(prior_bpd(s, x0), exact, rtol=1e-9, atol=1e-15)  # cancellation at abar ~ 1e-9
    worst = -math.log1p(-a) / (2 * LN2)  # |x_0| = 1 everywhere
    assert float(prior_bpd(s, torch.ones(1, 1, 2, 2, dtype=torch.float64))) == pytest.approx(worst, rel=1e-6)
    assert a / (2 * LN2) <= worst <= a / (2 * LN2) * (1 + a)
    if name == "linear":
        assert worst == pytest.approx(2.9e-5, abs=0.05e-5)


# --- section 8: the estimator of the bound ------------------------------------------------------------------
def test_systematic_draws_are_unbiased_through_the_average_over_strata():
    """Draw j lands in stratum j of p's CDF, so its own distribution is not p; the average over the m strata is."""
    T, k, m = 60, 4, 5
    p = log_uniform(k, T - 1, T)
    u = (np.arange(20000) + 0.5) / 20000
    draws = np.stack([systematic_draws(p, m, x) for x in u])  # [u, m]
    per_stratum = np.stack([np.bincount(draws[:, j], minlength=T) / len(u) for j in range(m)])
    assert min(0.5 * np.abs(q - p).sum() for q in per_stratum) > 0.5  # no single draw is marginally p
    np.testing.assert_allclose(per_stratum.mean(0), p, atol=2e-4)
    assert draws.min() >= k and draws.max() <= T - 2  # drawn only between the exact sets {1..k} and {T}


def test_the_estimators_exact_and_drawn_sets_give_the_whole_bound():
    """E L_hat = L_T + sum over the exact set {i < k} and {T - 1} + E (1/m) sum_j f_{i_j} / p_{i_j} = the bound,
    with the pilot's log-uniform proposal and with a shaped one mixed with 10% of it."""
    T, k, m = 80, 4, 3
    f = np.random.default_rng(0).gamma(0.5, 1.0, T) / np.arange(1, T + 1)
    edges = geometric_edges(k, T - 1, 6)
    pilot_sq = np.array([np.sum(f[edges[b]:edges[b + 1]] ** 2) for b in range(len(edges) - 1)])
    shaped = shaped_proposal(pilot_sq, edges, T)
    g = np.zeros(T)
    for b in range(len(edges) - 1):
        g[edges[b]:edges[b + 1]] = math.sqrt(pilot_sq[b] / (edges[b + 1] - edges[b]))
    np.testing.assert_allclose(shaped, (1 - DEFENSIVE) * g / g.sum() + DEFENSIVE * log_uniform(k, T - 1, T),
                               rtol=1e-12, atol=1e-15)
    exact = f[:k].sum() + f[T - 1]
    u = (np.arange(50000) + 0.5) / 50000
    for p in (log_uniform(k, T - 1, T), shaped):
        idx = np.stack([systematic_draws(p, m, x) for x in u])
        drawn = (f[idx] / p[idx]).mean(axis=1)
        assert exact + drawn.mean() == pytest.approx(f.sum(), rel=1e-3)


def test_two_phases_combine_as_one_mean_with_the_sum_of_their_variances():
    rng = np.random.default_rng(1)
    pilot, rest = rng.normal(3.0, 2.0, 25), rng.normal(3.0, 0.5, 75)
    est = grouped_mean_estimate([pilot, rest])
    assert est.mean == pytest.approx(np.concatenate([pilot, rest]).mean())
    n = 100
    assert est.stderr**2 == pytest.approx((25 * pilot.var(ddof=1) + 75 * rest.var(ddof=1)) / n**2)


# --- section 6: what training calls -------------------------------------------------------------------------
def test_training_runs_l_simple_with_uniform_t_under_the_defaults():
    """Trainer.loss calls objectives.training_losses and draws t from its t_sampler; with loss simple, uniform t
    and no weighting that is Ho's Algorithm 1: t = randint(T) from the noise generator, then l_simple."""
    cfg = TrainConfig(steps=1, batch_size=8, seed=3)
    s = NoiseSchedule.named("linear", 40)
    trainer = Trainer(tiny_unet(), s, digits_images(), cfg, torch.device("cpu"))
    trainer.model.eval()  # no dropout: the two evaluations must see the same network
    x0, t, noise, weights = trainer.batch()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    assert weights is None and torch.equal(t, torch.randint(s.T, (8,), generator=g))
    assert torch.equal(trainer.loss(x0, t, noise, weights)[0], l_simple(trainer.model, s, x0, t, noise).mean())


# --- section 10: learned variances ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,T", SCHEDULE_GRID)
def test_learned_range_is_a_log_space_interpolation_between_the_fixed_variances(name, T):
    s = NoiseSchedule.named(name, T)
    t = torch.arange(T)
    v = torch.linspace(-1, 1, 9, dtype=torch.float64)
    logs = torch.stack([d.learned_range_variance(s, t, torch.full((T, 1, 1, 1), float(x), dtype=torch.float64))[1]
                        .flatten() for x in v])  # [9, T]
    log_beta, log_tilde = torch.tensor(np.log(s.betas)), torch.tensor(s.posterior_log_variance_clipped)
    torch.testing.assert_close(logs[0], log_tilde, rtol=0, atol=1e-12)   # v = -1: beta_tilde_t (clipped at t = 1)
    torch.testing.assert_close(logs[-1], log_beta, rtol=0, atol=1e-12)   # v = 1: beta_t
    assert torch.all(log_beta >= log_tilde - 1e-12)                      # so the variance is monotone in v
    assert torch.all(logs.diff(dim=0) >= -1e-12)
    assert torch.all(logs.diff(dim=0)[:, log_beta > log_tilde + 1e-9] > 0)
    torch.testing.assert_close(logs.diff(dim=0, n=2), torch.zeros(7, T, dtype=torch.float64), rtol=0, atol=1e-10)


def test_the_network_gives_the_mean_in_its_first_C_channels_and_v_in_the_last_C():
    s = NoiseSchedule.named("cosine", 30)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.tensor([0, 3, 17, 29])
    pred, v = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.rand(4, 3, 2, 2, generator=g) * 2 - 1
    base = d.p_mean_variance(lambda x, tt: torch.cat([pred, v.double()], 1), s, x_t, t, "learned_range")
    other_v = d.p_mean_variance(lambda x, tt: torch.cat([pred, -v.double()], 1), s, x_t, t, "learned_range")
    other_pred = d.p_mean_variance(lambda x, tt: torch.cat([pred + 1, v.double()], 1), s, x_t, t, "learned_range")
    assert torch.equal(base["mean"], other_v["mean"]) and not torch.equal(base["variance"], other_v["variance"])
    assert torch.equal(base["variance"], other_pred["variance"]) and not torch.equal(base["mean"], other_pred["mean"])
    fixed = d.p_mean_variance(lambda x, tt: pred, s, x_t, t, "fixed_small")
    torch.testing.assert_close(base["mean"], fixed["mean"], rtol=0, atol=0)


def test_log_space_keeps_sigma_positive_and_the_kl_free_of_the_scale_of_beta():
    """Why the interpolation is in log space: any v gives a positive variance (the same frac in the variance
    itself goes negative), and the KL and its gradient in log sigma^2 depend only on the ratio of the variances."""
    s = NoiseSchedule.named("linear", 1000)
    t = torch.arange(1000)
    var, _ = d.learned_range_variance(s, t, torch.full((1000, 1, 1, 1), -5.0, dtype=torch.float64))
    assert torch.all(var > 0)
    frac = (-5.0 + 1) / 2
    linear_mix = frac * s.betas + (1 - frac) * s.posterior_variance
    assert (linear_mix < 0).any()
    grads = []
    for scale in (1e-4, 1e-1):
        log_var = torch.tensor(math.log(scale) + 0.3, dtype=torch.float64, requires_grad=True)
        zero = torch.zeros((), dtype=torch.float64)
        kl = normal_kl(zero, torch.tensor(math.log(scale), dtype=torch.float64), zero, log_var)
        (g,) = torch.autograd.grad(kl, log_var)
        sigma2 = math.exp(float(log_var.detach()))
        grads.append((float(kl.detach()), float(g), float(g) / sigma2))  # last: d KL / d sigma^2
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12) and grads[0][1] == pytest.approx(grads[1][1], rel=1e-12)
    assert grads[0][2] / grads[1][2] == pytest.approx(1e3, rel=1e-9)  # in sigma^2 the gradient scales as 1/beta


@pytest.mark.parametrize("beta_tilde,error", [(5.45e-5, 0.0), (5.45e-5, 0.01), (0.02, 0.3), (0.5, 1.0)])
def test_the_bound_asks_for_sigma2_equal_to_beta_tilde_plus_the_squared_mean_error(beta_tilde, error):
    """d/d sigma^2 of KL(N(mu_tilde, beta_tilde) || N(mu_tilde + e, sigma^2)) is 0 at sigma^2 = beta_tilde + e^2."""
    best = math.log(beta_tilde + error**2)
    log_var = torch.tensor(best, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros((), dtype=torch.float64)
    kl = normal_kl(zero, torch.tensor(math.log(beta_tilde), dtype=torch.float64), zero + error, log_var)
    (g,) = torch.autograd.grad(kl, log_var)
    assert abs(float(g)) < 1e-12
    for step in (-0.1, 0.1):
        other = normal_kl(zero, torch.tensor(math.log(beta_tilde), dtype=torch.float64), zero + error,
                          torch.tensor(best + step, dtype=torch.float64))
        assert float(other) > float(kl.detach())


@pytest.mark.parametrize("name,T", SCHEDULE_GRID)
def test_the_two_ends_are_the_optima_for_one_point_and_for_gaussian_data(name, T):
    """beta_tilde_t + coef1_t^2 Var(x_0 | x_t): Var = 0 (one point) gives beta_tilde_t, x_0 ~ N(0, I) has
    Var(x_0 | x_t) = 1 - abar_t and gives beta_t, for every t >= 2."""
    s = NoiseSchedule.named(name, T)
    gaussian = s.posterior_variance + s.posterior_mean_coef1**2 * (1 - s.alphas_cumprod)
    np.testing.assert_allclose(gaussian[1:], s.betas[1:], rtol=1e-10)


# --- section 11: the hybrid and vlb losses --------------------------------------------------------------------
def _batch(T: int, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = NoiseSchedule.named("linear", T)
    x0 = torch.randint(0, 256, (n, 2, 3, 3), generator=g).double() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = (0.5 * torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    return s, x0, noise, out


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_no_gradient_of_the_vlb_term_reaches_the_mean(objective):
    s, x0, noise, out = _batch(60)
    t = torch.tensor([0, 1, 5, 30, 58, 59])
    model = lambda x, tt: out  # noqa: E731
    hybrid = training_losses(model, s, x0, t, noise, objective, "learned_range", "hybrid")
    simple = l_simple(lambda x, tt: out[:, :2], s, x0, t, noise, objective)
    (g,) = torch.autograd.grad((hybrid - simple).sum(), out)  # the vb term alone
    assert torch.all(g[:, :2] == 0) and torch.all(g[:, 2:].abs().sum(dim=(1, 2, 3)) > 0)
    vlb = training_losses(model, s, x0, t, noise, objective, "learned_range", "vlb")
    (g_full,) = torch.autograd.grad(vlb.sum(), out)
    assert torch.all(g_full[:, :2].abs().sum(dim=(1, 2, 3)) > 0)  # the vlb loss alone trains the mean too


@pytest.mark.parametrize("T", [50, 200])
def test_the_vb_term_is_scaled_by_T_over_1000_so_lambda_is_0001_on_the_sum_of_T_terms(T):
    s, x0, noise, out = _batch(T, n=1)
    x0, noise, out = x0.expand(T, -1, -1, -1), noise.expand(T, -1, -1, -1), out.detach().expand(T, -1, -1, -1)
    t = torch.arange(T)  # every t once, same image and noise: the uniform expectation exactly
    model = lambda x, tt: out  # noqa: E731
    extra = (training_losses(model, s, x0, t, noise, "eps", "learned_range", "hybrid")
             - l_simple(lambda x, tt: out[:, :2], s, x0, t, noise)).double()
    vb = vb_terms_bpd(model, s, x0, d.q_sample(s, x0, t, noise), t, "learned_range")
    assert HYBRID_LAMBDA_T == 1000
    torch.testing.assert_close(extra, vb * T / 1000, rtol=1e-5, atol=1e-7)  # L_simple is float32
    assert float(extra.mean()) == pytest.approx(0.001 * float(vb.sum()), rel=1e-5)


@pytest.mark.parametrize("v", [-1.0, 0.0, 0.7])
def test_the_vlb_loss_averages_over_t_to_the_bound_minus_the_prior(v):
    """One-point data with its exact eps: every term is noise-free, so E_t[T L_t] = sum_t L_t is exact."""
    s = NoiseSchedule.named("cosine", 40)
    c = (torch.tensor([0, 255, 128, 17, 200, 64], dtype=torch.float64) / 127.5 - 1).view(1, 6, 1, 1)
    model = lambda x, t: torch.cat([one_point(c, s)(x, t), torch.full_like(x, v)], 1)  # noqa: E731
    x0, t = c.expand(40, -1, -1, -1).clone(), torch.arange(40)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vlb = training_losses(model, s, x0, t, noise, "eps", "learned_range", "vlb")
    bound = nll_bpd(model, s, c, "learned_range", generator=torch.Generator().manual_seed(1))
    assert float(vlb.mean()) == pytest.approx(bound["total_bpd"] - bound["prior_bpd"], rel=1e-9)


# --- section 12: importance sampling of t in training -----------------------------------------------------------
def _warm(T: int = 12) -> LossSecondMomentSampler:
    sampler = LossSecondMomentSampler(T)
    t = torch.arange(T).repeat(10)
    sampler.update(t, (t + 1.0) ** 1.5 * (1 + 0.2 * torch.rand(len(t), generator=torch.Generator().manual_seed(0))))
    return sampler


def test_the_weights_1_over_T_p_give_back_the_uniform_expectation():
    sampler = _warm()
    T, p = sampler.T, sampler.probs()
    losses = torch.rand(T, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    assert float((p * losses / (T * p)).sum()) == pytest.approx(float(losses.mean()), rel=1e-12)
    rms = sampler.history.pow(2).mean(1).sqrt()
    torch.testing.assert_close(p, (1 - UNIFORM_MIX) * rms / rms.sum() + UNIFORM_MIX / T, rtol=1e-12, atol=0)
    t, w = sampler.sample(50, torch.Generator().manual_seed(4))
    torch.testing.assert_close(w, 1.0 / (T * p[t]), rtol=0, atol=0)


def test_p_proportional_to_the_rms_minimises_the_second_moment():
    """E_p[(L_t / (T p_t))^2] = sum_t E[L_t^2] / (T^2 p_t) is smallest at p ~ sqrt(E[L_t^2]) (Cauchy-Schwarz),
    and there it is below the uniform draw's (1/T) sum_t E[L_t^2] unless all RMS are equal."""
    second = np.random.default_rng(3).gamma(0.7, 1.0, 30) ** 2
    T = len(second)
    moment = lambda p: float((second / (T**2 * p)).sum())  # noqa: E731
    best = np.sqrt(second) / np.sqrt(second).sum()
    assert moment(best) == pytest.approx(np.sqrt(second).sum() ** 2 / T**2, rel=1e-12)
    uniform = moment(np.full(T, 1 / T))
    assert uniform == pytest.approx(second.mean(), rel=1e-12) and moment(best) < uniform
    rng = np.random.default_rng(4)
    for _ in range(200):
        other = best * np.exp(0.3 * rng.normal(size=T))
        assert moment(other / other.sum()) >= moment(best)


def test_before_warm_up_training_is_uniform_and_after_it_the_vlb_loss_is_section_8s_f_over_p():
    """With loss vlb an importance-weighted example is T L_t / (T p_t) = L_t / p_t: the bound estimator of
    section 8 with one draw and no exact set."""
    s = NoiseSchedule.named("linear", 30)
    cfg = TrainConfig(steps=1, batch_size=6, variance="learned_range", loss="vlb", t_sampler="loss_second_moment")
    trainer = Trainer(tiny_unet(out_channels=2), s, digits_images(), cfg, torch.device("cpu"))
    trainer.model.eval()
    x0, t, noise, weights = trainer.batch()
    assert weights is None  # no history yet: uniform t, every weight 1
    trainer.t_sampler = _warm(30)
    x0, t, noise, weights = trainer.batch()
    p = trainer.t_sampler.probs()
    per_example = training_losses(trainer.model, s, x0, t, noise, "eps", "learned_range", "vlb")
    vb = vb_terms_bpd(trainer.model, s, x0, d.q_sample(s, x0, t, noise), t, "learned_range")
    torch.testing.assert_close(per_example.double() * weights, vb.double() / p[t], rtol=1e-5, atol=0)
    torch.testing.assert_close(trainer.loss(x0, t, noise, weights)[0], (per_example * weights.float()).mean(),
                               rtol=1e-6, atol=0)


# --- section 13: Min-SNR weighting --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,T", SCHEDULE_GRID)
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_every_target_to_min_snr_gamma_times_the_x0_error(name, T, gamma):
    """Section 7's factors (eps: SNR, x0: 1, v: 1 + SNR) times the weight are min(SNR, gamma) for all three; for
    eps the weight is 1 where SNR <= gamma and gamma / SNR < 1 at the small t where SNR > gamma."""
    s = NoiseSchedule.named(name, T)
    t = torch.arange(T)
    snr = s.alphas_cumprod / (1 - s.alphas_cumprod)
    target = np.minimum(snr, gamma)
    for objective, factor in (("eps", snr), ("x0", np.ones(T)), ("v", 1 + snr)):
        np.testing.assert_allclose(min_snr_weight(s, t, objective, gamma).numpy() * factor, target, rtol=1e-12)
    w = min_snr_weight(s, t, "eps", gamma).numpy()
    assert np.all(w[snr <= gamma] == 1) and np.all(w[snr > gamma] < 1) and (snr > gamma).any()
    assert np.all(np.diff(w) >= 0)  # SNR falls with t, so the eps weight never decreases


def test_under_hybrid_min_snr_weights_only_the_regression_term():
    s, x0, noise, out = _batch(50)
    t = torch.tensor([0, 1, 4, 20, 40, 49])
    model = lambda x, tt: out.detach()  # noqa: E731
    loss = lambda **kw: training_losses(model, s, x0, t, noise, "eps", "learned_range", **kw).double()  # noqa: E731
    w = min_snr_weight(s, t, "eps", 5.0)
    simple = l_simple(lambda x, tt: out.detach()[:, :2], s, x0, t, noise).double()
    torch.testing.assert_close(loss(loss="hybrid", weighting="min_snr") - w * simple,
                               loss(loss="hybrid") - simple, rtol=1e-5, atol=1e-6)
