"""Samplers: Algorithm 2, respacing, DDIM(eta), seeding."""

import numpy as np
import pytest
import torch

from ddpm_core.sampling import ancestral_sample, ddim_coefficients, ddim_sample, sample, sample_seeds
from ddpm_core.schedules import NoiseSchedule, respace

S = NoiseSchedule.named("linear", 100)


def analytic(x, t):
    """diffusers' stand-in network: eps(x, t) = x * t / (t + 1)."""
    return x * (t.view(-1, 1, 1, 1).float() / (t.view(-1, 1, 1, 1).float() + 1))


def oracle(c: torch.Tensor, s: NoiseSchedule):
    """Bayes-optimal eps for the one-point data set {c}, seen through the original t index."""
    b = torch.tensor(S.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)
    a = torch.tensor(S.sqrt_alphas_cumprod, dtype=torch.float32)
    return lambda x, t: (x - a[t].view(-1, 1, 1, 1) * c) / b[t].view(-1, 1, 1, 1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_ddim_eta1_on_the_full_grid_is_ancestral_sampling():
    shape = (6, 1, 4, 4)
    a = ancestral_sample(analytic, S, shape, gen(), variance="fixed_small")
    b = ddim_sample(analytic, S, shape, gen(), eta=1.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, ddim_sample(analytic, S, shape, gen(), eta=0.0), atol=1e-2)


@pytest.mark.parametrize("name, T, K", [("linear", 1000, 1000), ("cosine", 1000, 50), ("cosine", 2, 2)])
def test_ddim_coefficients_are_float64_and_eta1_gives_the_posterior_variance(name, T, K):
    """sigma_t^2 at eta = 1 is (1 - abar_prev)/(1 - abar) * beta_t = beta_tilde_t (on any grid, with the grid's
    betas), and then c_t^2 = 1 - abar_prev - beta_tilde_t; at eta = 0, sigma = 0 and c_t^2 = 1 - abar_prev."""
    s = respace(NoiseSchedule.named(name, T), K) if K < T else NoiseSchedule.named(name, T)
    sigma, c = ddim_coefficients(s, 1.0)
    assert sigma.dtype == np.float64 and c.dtype == np.float64
    np.testing.assert_allclose(sigma**2, s.posterior_variance, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(c**2, 1 - s.alphas_cumprod_prev - s.posterior_variance, rtol=1e-10, atol=1e-15)
    sigma0, c0 = ddim_coefficients(s, 0.0)
    assert not sigma0.any()
    np.testing.assert_allclose(c0, np.sqrt(1 - s.alphas_cumprod_prev), rtol=1e-15)


def test_samplers_are_deterministic_given_the_seed():
    shape = (3, 1, 4, 4)
    for f in (lambda g: ancestral_sample(analytic, S, shape, g), lambda g: ddim_sample(analytic, S, shape, g, eta=0.5)):
        assert torch.equal(f(gen(7)), f(gen(7)))
        assert not torch.equal(f(gen(7)), f(gen(8)))


@pytest.mark.parametrize("K", [100, 20, 5])
def test_oracle_samples_land_exactly_on_the_data_point(K):
    """With the optimal predictor x0_hat = c at every step; Algorithm 2 adds no noise at the last step,
    so every sampler must return c itself, whatever the noise."""
    c = torch.rand(1, 1, 4, 4) * 2 - 1
    s = respace(S, K)
    model = oracle(c, s)
    for x in (ancestral_sample(model, s, (4, 1, 4, 4), gen(1)),
              ancestral_sample(model, s, (4, 1, 4, 4), gen(1), variance="fixed_large"),
              ddim_sample(model, s, (4, 1, 4, 4), gen(2), eta=0.0),
              ddim_sample(model, s, (4, 1, 4, 4), gen(2), eta=1.0)):
        torch.testing.assert_close(x, c.expand_as(x), rtol=0, atol=1e-4)


def test_respaced_sampler_shows_the_network_original_t():
    seen = []

    def spy(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    ancestral_sample(spy, respace(S, 5), (1, 1, 2, 2), gen())
    assert seen == [99, 74, 50, 25, 0]


def test_respacing_with_K_equal_T_samples_identically():
    shape = (2, 1, 4, 4)
    torch.testing.assert_close(ancestral_sample(analytic, respace(S, 100), shape, gen(3)),
                               ancestral_sample(analytic, S, shape, gen(3)), rtol=1e-6, atol=1e-6)


def test_sample_batches_clips_and_validates():
    x = sample(analytic, S, n=5, image_shape=(1, 4, 4), seed=0, sampler="ddim", steps=10, batch_size=2,
               progress=False)
    assert x.shape == (5, 1, 4, 4) and x.min() >= -1 and x.max() <= 1
    y = sample(analytic, S, n=5, image_shape=(1, 4, 4), seed=0, sampler="ddim", steps=10, batch_size=2,
               progress=False)
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        sample(analytic, S, n=1, image_shape=(1, 2, 2), seed=0, sampler="plms")


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_on_step_sees_every_step_and_changes_nothing(sampler):
    s, shape, seen = respace(S, 7), (2, 1, 4, 4), []

    def draw(on_step=None):
        if sampler == "ancestral":
            return ancestral_sample(oracle(torch.full((1, 4, 4), 0.5), s), s, shape, gen(5), on_step=on_step)
        return ddim_sample(oracle(torch.full((1, 4, 4), 0.5), s), s, shape, gen(5), eta=0.5, on_step=on_step)

    with_callback = draw(lambda i, x_t, x0_hat: seen.append((i, x_t.clone(), x0_hat.clone())))
    assert torch.equal(with_callback, draw())
    assert [i for i, _, _ in seen] == list(range(6, -1, -1))
    assert all(x_t.shape == shape and x0_hat.shape == shape for _, x_t, x0_hat in seen)
    torch.testing.assert_close(seen[-1][2], torch.full(shape, 0.5))  # the oracle predicts the data point
    assert torch.equal(seen[0][1], torch.randn(shape, generator=gen(5)))  # the first x_t is the x_T draw


@pytest.mark.parametrize("sampler,eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_each_seed_gives_its_image_whatever_it_is_batched_with(sampler, eta):
    """sample_seeds: image i is sample(n=1, seed=seeds[i]), in any batch, with any neighbours."""
    kw = dict(image_shape=(1, 4, 4), sampler=sampler, steps=10, eta=eta, variance="fixed_small")
    seeds = [3, 0, 12, 3]
    x = sample_seeds(analytic, S, seeds, batch_size=3, **kw)
    alone = torch.cat([sample(analytic, S, n=1, seed=s, progress=False, **kw) for s in seeds])
    assert x.shape == (4, 1, 4, 4) and torch.equal(x[0], x[3]) and not torch.equal(x[0], x[1])
    torch.testing.assert_close(x, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(sample_seeds(analytic, S, [12, 5], batch_size=8, **kw)[0], x[2], rtol=0, atol=1e-6)
    assert sample_seeds(analytic, S, [], **kw).shape == (0, 1, 4, 4)
