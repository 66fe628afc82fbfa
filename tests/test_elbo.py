"""The negative ELBO against closed forms: a one-point data set has a known Bayes-optimal eps-predictor."""

import math

import numpy as np
import pytest
import torch

from ddpm_core.elbo import nll_bpd, prior_bpd
from ddpm_core.schedules import NoiseSchedule

LN2 = math.log(2)


def one_point(c: torch.Tensor, s: NoiseSchedule):
    """eps*(x_t, t) = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t): exact when the data set is {c}."""
    sqrt_abar = torch.tensor(s.sqrt_alphas_cumprod)
    sqrt_1m = torch.tensor(s.sqrt_one_minus_alphas_cumprod)

    def eps_model(x_t, t):
        assert t.dtype == torch.long and x_t.shape[0] == t.shape[0]
        a, b = sqrt_abar[t].view(-1, 1, 1, 1).to(x_t.dtype), sqrt_1m[t].view(-1, 1, 1, 1).to(x_t.dtype)
        return (x_t - a * c) / b

    return eps_model


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def expected_parts(c: torch.Tensor, s: NoiseSchedule, variance: str):
    abar_T = s.alphas_cumprod[-1]
    prior = (0.5 * (-1 - math.log(1 - abar_T) + (1 - abar_T) + abar_T * c.double() ** 2)).mean().item() / LN2
    sigma = math.sqrt(s.posterior_variance[1])  # both variances use beta_tilde_2 at t = 1
    h = 1 / 255
    probs = [phi(h / sigma) if abs(v) > 0.999 else 2 * phi(h / sigma) - 1 for v in c.flatten().tolist()]
    decoder = -np.mean(np.log(probs)) / LN2
    if variance == "fixed_small":
        kl = np.zeros(s.T - 1)
    else:
        ratio = s.posterior_variance[1:] / s.betas[1:]
        kl = 0.5 * (-np.log(ratio) + ratio - 1) / LN2
    return prior, decoder, kl


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("name,T", [("linear", 100), ("cosine", 50)])
def test_nll_bpd_reproduces_the_one_point_oracle(variance, name, T):
    s = NoiseSchedule.named(name, T)
    pixels = torch.tensor([0, 255, 128, 17, 200, 64, 1, 254, 90, 33, 77, 250], dtype=torch.float64)
    c = (pixels / 127.5 - 1).view(1, 3, 2, 2)
    x0 = c.expand(3, -1, -1, -1).clone()
    out = nll_bpd(one_point(c, s), s, x0, variance=variance, chunk_size=37,
                  generator=torch.Generator().manual_seed(0))
    prior, decoder, kl = expected_parts(c, s, variance)
    assert out["prior_bpd"] == pytest.approx(prior, rel=1e-9)
    assert out["decoder_bpd"] == pytest.approx(decoder, rel=1e-6)
    assert out["terms_bpd"].shape == (T,)
    np.testing.assert_allclose(out["terms_bpd"][1:], kl, rtol=1e-6, atol=1e-9)
    assert out["total_bpd"] == pytest.approx(prior + decoder + kl.sum(), rel=1e-6)
    assert out["total_bpd"] == pytest.approx(out["prior_bpd"] + out["terms_bpd"].sum(), rel=1e-12)


def test_a_wrong_model_costs_more_bits():
    s = NoiseSchedule.named("linear", 40)
    c = (torch.tensor([10, 100, 240, 128], dtype=torch.float64) / 127.5 - 1).view(1, 1, 2, 2)
    x0 = c.expand(2, -1, -1, -1).clone()
    best = nll_bpd(one_point(c, s), s, x0, generator=torch.Generator().manual_seed(0))
    shifted = one_point(c + 0.05, s)
    worse = nll_bpd(shifted, s, x0, generator=torch.Generator().manual_seed(0))
    assert worse["total_bpd"] > best["total_bpd"] + 0.1
    assert np.all(worse["terms_bpd"][1:] > 0)


def test_prior_is_tiny_for_linear_1000():
    s = NoiseSchedule.named("linear", 1000)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    assert 0 < prior_bpd(s, x0).mean().item() < 1e-4


def test_seeded_evaluation_is_deterministic_and_the_prior_does_not_depend_on_noise():
    s = NoiseSchedule.named("linear", 30)
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    x0 = (torch.randint(0, 256, (3, 1, 5, 5)).double() / 127.5 - 1)
    model = lambda x, t: net(x) * (1 + t.view(-1, 1, 1, 1) / 30)  # noqa: E731
    with torch.no_grad():
        a = nll_bpd(model, s, x0, chunk_size=7, generator=torch.Generator().manual_seed(5))
        b = nll_bpd(model, s, x0, chunk_size=7, generator=torch.Generator().manual_seed(5))
        c = nll_bpd(model, s, x0, chunk_size=90, generator=torch.Generator().manual_seed(6))
    assert a["total_bpd"] == b["total_bpd"]
    assert a["total_bpd"] != c["total_bpd"] and a["prior_bpd"] == c["prior_bpd"]


def test_input_checks():
    s = NoiseSchedule.named("linear", 30)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        nll_bpd(lambda x, t: x, s, torch.full((1, 1, 2, 2), 2.0))
    with pytest.raises(ValueError, match="N, C, H, W"):
        nll_bpd(lambda x, t: x, s, torch.zeros(2, 2))
