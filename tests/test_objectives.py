"""Learned variances, the hybrid and vlb losses, importance-sampled t and Min-SNR, against closed forms."""

import math

import numpy as np
import pytest
import torch

from ddpm_core import diffusion as d
from ddpm_core.elbo import nll_bpd, vb_terms_bpd
from ddpm_core.losses import l_simple
from ddpm_core.objectives import min_snr_weight, training_losses
from ddpm_core.resample import LossSecondMomentSampler, UniformSampler, make_t_sampler
from ddpm_core.sampling import ancestral_sample, ddim_sample
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.serving import load_eps_model, save_eps_model
from ddpm_core.train import TrainConfig, Trainer
from tests.helpers import TINY_MODEL, digits_images, tiny_unet
from tests.test_elbo import LN2, expected_parts, one_point, phi

PIXELS = torch.tensor([0, 255, 128, 17, 200, 64, 1, 254, 90, 33, 77, 250], dtype=torch.float64)
C = (PIXELS / 127.5 - 1).view(1, 3, 2, 2)


def with_v(model, v: float):
    """The network's output [eps | v] with a constant v."""
    return lambda x, t: torch.cat([model(x, t), torch.full_like(x, v)], dim=1)


# --- learned_range: p_mean_variance and the ELBO -----------------------------------------------------------
def test_learned_range_interpolates_log_variances_between_the_fixed_ones():
    s = NoiseSchedule.named("linear", 100)
    t = torch.tensor([0, 1, 50, 99])
    x = torch.zeros(4, 3, 2, 2, dtype=torch.float64)
    model = one_point(C, s)
    lo = d.p_mean_variance(with_v(model, -1.0), s, x, t, variance="learned_range")
    hi = d.p_mean_variance(with_v(model, 1.0), s, x, t, variance="learned_range")
    mid = d.p_mean_variance(with_v(model, 0.0), s, x, t, variance="learned_range")
    fixed = d.p_mean_variance(model, s, x, t, variance="fixed_small")
    torch.testing.assert_close(lo["log_variance"], fixed["log_variance"].expand_as(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(lo["mean"], fixed["mean"], rtol=0, atol=0)
    log_beta = torch.tensor(np.log(s.betas))[t].view(-1, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(hi["log_variance"], log_beta, rtol=0, atol=1e-12)
    torch.testing.assert_close(mid["variance"], (lo["variance"] * hi["variance"]).sqrt(), rtol=1e-12, atol=0)


def test_learned_range_needs_2C_output_channels():
    s = NoiseSchedule.named("linear", 30)
    x, t = torch.zeros(2, 3, 2, 2), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="needs a network with 6 output channels .* got 3"):
        d.p_mean_variance(lambda x, t: x, s, x, t, variance="learned_range")
    with pytest.raises(ValueError, match="needs a network with 3 output channels .* got 6"):
        d.p_mean_variance(lambda x, t: torch.cat([x, x], 1), s, x, t, variance="fixed_small")


@pytest.mark.parametrize("name,T", [("linear", 100), ("cosine", 50)])
def test_bayes_optimal_learned_range_has_zero_kl_and_the_known_decoder(name, T):
    """Exact eps and v = -1 (sigma_t^2 = beta_tilde_t): every KL is 0, the decoder uses sigma_1^2 = beta_tilde_2."""
    s = NoiseSchedule.named(name, T)
    x0 = C.expand(3, -1, -1, -1).clone()
    out = nll_bpd(with_v(one_point(C, s), -1.0), s, x0, variance="learned_range", chunk_size=37,
                  generator=torch.Generator().manual_seed(0))
    prior, decoder, kl = expected_parts(C, s, "fixed_small")
    assert out["decoder_bpd"] == pytest.approx(decoder, rel=1e-6)
    np.testing.assert_allclose(out["terms_bpd"][1:], 0.0, atol=1e-9)
    assert out["total_bpd"] == pytest.approx(prior + decoder, rel=1e-6)


def test_a_learned_variance_sets_the_kl_terms_and_the_decoder_scale():
    """v = 0: sigma_t^2 = sqrt(beta_t beta_tilde_t); KL = (r - 1 - log r) / 2 with r = beta_tilde / sigma^2,
    and the decoder's sigma_1 is the learned one, not beta_tilde_2."""
    s = NoiseSchedule.named("linear", 60)
    x0 = C.expand(2, -1, -1, -1).clone()
    out = nll_bpd(with_v(one_point(C, s), 0.0), s, x0, variance="learned_range",
                  generator=torch.Generator().manual_seed(1))
    log_sigma2 = 0.5 * np.log(s.betas) + 0.5 * s.posterior_log_variance_clipped
    r = s.posterior_variance[1:] / np.exp(log_sigma2[1:])
    np.testing.assert_allclose(out["terms_bpd"][1:], 0.5 * (r - 1 - np.log(r)) / LN2, rtol=1e-6, atol=1e-14)
    sigma1 = math.exp(0.5 * log_sigma2[0])
    probs = [phi(1 / 255 / sigma1) if abs(c) > 0.999 else 2 * phi(1 / 255 / sigma1) - 1 for c in C.flatten().tolist()]
    assert out["decoder_bpd"] == pytest.approx(-np.mean(np.log(probs)) / LN2, rel=1e-6)


def test_samplers_use_the_learned_variance_and_ddim_ignores_it():
    """v = -1 samples as fixed_small, v = 1 as fixed_large (same noise); DDIM reads only the mean half."""
    s = NoiseSchedule.named("linear", 30)
    model = one_point(torch.rand(1, 1, 4, 4, dtype=torch.float64) * 2 - 1, s)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    shape = (3, 1, 4, 4)
    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        torch.testing.assert_close(ancestral_sample(with_v(model, v), s, shape, g(), variance="learned_range"),
                                   ancestral_sample(model, s, shape, g(), variance=fixed), rtol=1e-6, atol=1e-6)
    for v in (-1.0, 0.3):
        torch.testing.assert_close(ddim_sample(with_v(model, v), s, shape, g(), eta=0.5, variance="learned_range"),
                                   ddim_sample(model, s, shape, g(), eta=0.5), rtol=0, atol=0)


# --- the hybrid and vlb losses ----------------------------------------------------------------------------
def _batch(T: int = 50, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = NoiseSchedule.named("linear", T)
    x0 = (torch.randint(0, 256, (n, 2, 3, 3), generator=g).double() / 127.5 - 1)
    t = torch.tensor([0, 1, 2, T // 2, T - 2, T - 1])[:n]  # index 0: the decoder term
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64).mul(0.5).requires_grad_(True)
    return s, x0, t, noise, out


def test_simple_loss_is_l_simple_bit_for_bit():
    s, x0, t, noise, out = _batch()
    model = lambda x, tt: out[:, :2]  # noqa: E731
    assert torch.equal(training_losses(model, s, x0, t, noise), l_simple(model, s, x0, t, noise))


def test_hybrid_value_and_its_gradient_on_the_mean_half_is_l_simples():
    s, x0, t, noise, out = _batch()
    hybrid = training_losses(lambda x, tt: out, s, x0, t, noise, variance="learned_range", loss="hybrid")
    (g_hybrid,) = torch.autograd.grad(hybrid.sum(), out)
    simple = l_simple(lambda x, tt: out[:, :2], s, x0, t, noise)
    (g_simple,) = torch.autograd.grad(simple.sum(), out)
    torch.testing.assert_close(g_hybrid[:, :2], g_simple[:, :2], rtol=0, atol=0)
    assert g_hybrid[:, 2:].abs().min() > 0 and torch.all(g_simple[:, 2:] == 0)
    x_t = d.q_sample(s, x0, t, noise)
    vb = vb_terms_bpd(lambda x, tt: out.detach(), s, x0, x_t, t, "learned_range")
    torch.testing.assert_close(hybrid.detach().double(), simple.detach() + vb * s.T / 1000, rtol=1e-6, atol=0)
    (g_vb,) = torch.autograd.grad((vb_terms_bpd(lambda x, tt: out, s, x0, x_t, t, "learned_range")
                                   * s.T / 1000).sum(), out)
    torch.testing.assert_close(g_hybrid[:, 2:], g_vb[:, 2:], rtol=1e-6, atol=1e-12)  # L_simple is float32


def test_vlb_loss_is_T_times_the_term_and_trains_both_halves():
    s, x0, t, noise, out = _batch()
    vlb = training_losses(lambda x, tt: out, s, x0, t, noise, variance="learned_range", loss="vlb")
    x_t = d.q_sample(s, x0, t, noise)
    expected = vb_terms_bpd(lambda x, tt: out, s, x0, x_t, t, "learned_range") * s.T
    torch.testing.assert_close(vlb, expected, rtol=0, atol=0)
    (g,) = torch.autograd.grad(vlb.sum(), out)
    assert g[:, :2].abs().sum() > 0 and g[:, 2:].abs().sum() > 0


# --- Min-SNR-gamma ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_weights_against_the_formula(gamma):
    s = NoiseSchedule.named("cosine", 200)
    t = torch.arange(200)
    abar = s.alphas_cumprod
    for objective, formula in (("eps", lambda r: min(r, gamma) / r), ("x0", lambda r: min(r, gamma)),
                               ("v", lambda r: min(r, gamma) / (r + 1))):
        expected = [formula(a / (1 - a)) for a in abar]
        np.testing.assert_allclose(min_snr_weight(s, t, objective, gamma).numpy(), expected, rtol=1e-12)


def test_min_snr_losses_of_consistent_predictions_are_one_weighted_x0_error():
    """eps-, x0- and v-losses of the same x0_hat, Min-SNR weighted, all equal min(SNR, gamma) |x0 - x0_hat|^2."""
    s, x0, t, noise, _ = _batch(T=100)
    x_t = d.q_sample(s, x0, t, noise)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    preds = {"eps": d.eps_from_x0(s, x_t, t, x0_hat), "x0": x0_hat,
             "v": d.v_from_eps_x0(s, t, d.eps_from_x0(s, x_t, t, x0_hat), x0_hat)}
    abar = torch.tensor(s.alphas_cumprod)[t]
    expected = torch.clamp(abar / (1 - abar), max=5.0) * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    for objective, pred in preds.items():
        loss = training_losses(lambda x, tt, p=pred: p, s, x0, t, noise, objective, weighting="min_snr")
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)  # L_simple is float32


# --- importance sampling of t -------------------------------------------------------------------------------
def _warm_sampler(T: int = 8, seed: int = 0) -> tuple[LossSecondMomentSampler, torch.Tensor]:
    """A sampler whose every t has seen 10 losses of scale (t + 1)^2: p is far from uniform."""
    sampler = LossSecondMomentSampler(T)
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T).repeat(12)
    sampler.update(t, (t + 1.0) ** 2 * (1 + 0.1 * torch.rand(len(t), generator=g)))
    return sampler, (torch.arange(T) + 1.0) ** 2


def test_warm_probabilities_follow_the_rms_of_the_last_10_losses():
    sampler, _ = _warm_sampler()
    rms = sampler.history.pow(2).mean(1).sqrt()
    assert sampler.warmed_up() and torch.all(sampler.counts == 10)
    torch.testing.assert_close(sampler.probs(), 0.999 * rms / rms.sum() + 0.001 / 8, rtol=1e-12, atol=0)
    sampler.update(torch.tensor([3]), torch.tensor([100.0]))  # the oldest loss of t = 3 drops out
    assert sampler.history[3, -1] == 100.0 and sampler.counts[3] == 10


def test_importance_sampled_loss_has_the_uniform_expectation():
    sampler, losses = _warm_sampler()
    p = sampler.probs()
    assert float((p * losses / (8 * p)).sum()) == pytest.approx(float(losses.mean()), rel=1e-12)  # exact
    t, w = sampler.sample(400_000, torch.Generator().manual_seed(1))
    estimate = losses[t].double() * w
    se = estimate.std() / math.sqrt(len(t))
    assert abs(float(estimate.mean()) - float(losses.mean())) < 4 * float(se)
    freq = torch.bincount(t, minlength=8).double() / len(t)
    torch.testing.assert_close(freq, p, rtol=0, atol=3e-3)
    assert float(se) < float(losses.std() / math.sqrt(len(t)))  # and the variance is lower than uniform's


def test_before_warm_up_the_draws_are_the_uniform_samplers():
    T, sampler = 5, make_t_sampler("loss_second_moment", 5)
    uniform = UniformSampler(T)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(4):
        (ta, wa), (tb, wb) = sampler.sample(7, ga), uniform.sample(7, gb)
        assert torch.equal(ta, tb) and wa is None and wb is None
        sampler.update(ta, torch.ones(7))
    assert not sampler.warmed_up()


def test_sampler_state_round_trips():
    sampler, _ = _warm_sampler()
    other = LossSecondMomentSampler(8)
    other.load_state_dict(sampler.state_dict())
    assert torch.equal(other.history, sampler.history) and torch.equal(other.counts, sampler.counts)
    with pytest.raises(ValueError, match="history has shape"):
        LossSecondMomentSampler(9).load_state_dict(sampler.state_dict())


# --- training and serving -----------------------------------------------------------------------------------
def test_train_config_refuses_what_does_not_train():
    with pytest.raises(ValueError, match=r"^loss = 'hybrid' is not allowed with variance = 'fixed_small': .*'learned_range'$"):
        TrainConfig(steps=1, loss="hybrid")
    with pytest.raises(ValueError, match=r"^variance = 'learned_range' is not allowed with loss = 'simple': L_simple gives the variance no "):
        TrainConfig(steps=1, variance="learned_range")
    with pytest.raises(ValueError, match=r"^loss_weighting = 'min_snr' is not allowed with loss = 'vlb'"):
        TrainConfig(steps=1, variance="learned_range", loss="vlb", loss_weighting="min_snr")


def test_hybrid_importance_sampled_training_runs_and_fills_the_history():
    cfg = TrainConfig(steps=12, batch_size=32, lr=2e-3, warmup_steps=2, seed=0, variance="learned_range",
                      loss="hybrid", t_sampler="loss_second_moment")
    trainer = Trainer(tiny_unet(out_channels=2), NoiseSchedule.named("linear", 25), digits_images(), cfg,
                      torch.device("cpu"))
    losses = [trainer.train_step() for _ in range(12)]
    assert all(math.isfinite(v) for v in losses)
    assert trainer.t_sampler.warmed_up()  # 384 draws over 25 steps: importance sampling ran
    assert trainer.state_dict()["t_sampler"]["history"].shape == (25, 10)


def test_the_served_file_rebuilds_a_learned_variance_network(tmp_path):
    """The registry's eps-model file (ddpm_core.serving) keeps a 2C-channel network's width and weights."""
    net = tiny_unet(out_channels=2).eval()
    meta = {"model": TINY_MODEL, "image_shape": [1, 8, 8], "variance": "learned_range", "objective": "eps",
            "sampling": {"sampler": "ancestral", "steps": 10, "eta": 0.0, "clip_x0": True, "batch_size": 8}}
    save_eps_model(tmp_path / "eps.pt", net, NoiseSchedule.named("cosine", 10), meta)
    back, schedule, saved = load_eps_model(tmp_path / "eps.pt")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([7, 3])
    with torch.no_grad():
        assert back(x, t).shape == (2, 2, 8, 8)
        torch.testing.assert_close(back(x, t), net(x, t), rtol=0, atol=0)
    assert saved == meta and schedule.T == 10
