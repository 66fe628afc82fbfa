"""The Monte-Carlo ELBO estimator: unbiased (against closed forms and the all-T estimator), intervals that
cover, common random numbers, and the bookkeeping of its parts."""

import numpy as np
import pytest
import torch

from ddpm_core.elbo import nll_bpd
from ddpm_core.elbo_mc import BoundDesign, estimate_bound, geometric_edges, log_uniform, shaped_proposal, systematic_draws
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.stats import mean_estimate
from tests.test_elbo import expected_parts, one_point


def grid_images(n: int, shape=(1, 4, 4), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).double() / 127.5 - 1


def test_systematic_draws_follow_the_proposal():
    p = log_uniform(3, 49, 50)
    rng = np.random.default_rng(0)
    counts = np.bincount(np.concatenate([systematic_draws(p, 7, rng.random()) for _ in range(20000)]), minlength=50)
    assert counts[:3].sum() == 0 and counts[49] == 0
    np.testing.assert_allclose(counts / counts.sum(), p, atol=3e-3)


def test_geometric_edges_cover_every_index_once():
    for lo, T, bins in [(1, 1000, 24), (4, 50, 24), (10, 12, 5)]:
        e = geometric_edges(lo, T, bins)
        assert e[0] == lo and e[-1] == T and np.all(np.diff(e) > 0)


def test_shaped_proposal_keeps_a_defensive_floor_and_falls_back():
    edges = geometric_edges(2, 99, 8)
    flat = shaped_proposal(np.zeros(len(edges) - 1), edges, 100)
    np.testing.assert_allclose(flat, log_uniform(2, 99, 100))
    sq = np.zeros(len(edges) - 1)
    sq[0] = 5.0
    p = shaped_proposal(sq, edges, 100)
    base = log_uniform(2, 99, 100)
    assert p.sum() == pytest.approx(1) and np.all(p[2:99] >= 0.1 * base[2:99] - 1e-15) and p[99] == 0


@pytest.mark.parametrize("design", [BoundDesign(exact_t=3, draws=5), BoundDesign(exact_t=1, draws=9, bins=6)])
def test_one_point_oracle_mean_agrees_with_the_closed_form(design):
    """fixed_large makes every KL term a known positive constant; only the t draws are random."""
    s = NoiseSchedule.named("linear", 100)
    pixels = torch.tensor([0, 255, 128, 17, 200, 64, 1, 254, 90, 33, 77, 250], dtype=torch.float64)
    c = (pixels / 127.5 - 1).view(1, 3, 2, 2)
    x0 = c.expand(40, -1, -1, -1).clone()
    est = estimate_bound(one_point(c, s), s, x0, np.arange(40), design, variance="fixed_large", seed=3)
    prior, decoder, kl = expected_parts(c, s, "fixed_large")
    truth = prior + decoder + kl.sum()
    assert est.total.ci_low <= truth <= est.total.ci_high
    assert abs(est.total.mean - truth) < 0.05 * truth
    assert est.decoder_bpd == pytest.approx(decoder, rel=1e-6)
    np.testing.assert_allclose(est.terms_bpd[1:design.exact_t], kl[:design.exact_t - 1], rtol=1e-6)
    assert est.terms_bpd[-1] == pytest.approx(kl[-1], rel=1e-6)  # t = T is exact too
    assert est.network_passes == 40 * design.passes_per_image()


def test_parts_add_up_and_all_t_mode_matches_nll_bpd():
    s = NoiseSchedule.named("cosine", 30)
    x0 = grid_images(6)
    model = one_point(grid_images(1, seed=9), s)
    mc = estimate_bound(model, s, x0, np.arange(6), BoundDesign(exact_t=4, draws=6), seed=1)
    assert mc.total.mean == pytest.approx(mc.prior_bpd + mc.terms_bpd.sum(), rel=1e-10)
    full = estimate_bound(model, s, x0, np.arange(6), BoundDesign(exact_t=30, draws=0), seed=1)
    ref = nll_bpd(model, s, x0)  # this model's terms do not depend on the noise: both are exact
    assert full.total.mean == pytest.approx(ref["total_bpd"], rel=1e-9)
    np.testing.assert_allclose(full.per_image, ref["per_image_bpd"], rtol=1e-9)
    assert full.network_passes == 180 and mc.network_passes == 66  # 4 smallest t, t = T, 6 drawn


@pytest.mark.slow
def test_intervals_cover_the_true_bound_about_95_percent():
    """A population of 32 images and a model whose terms are exact functions of the image: the truth is the
    population mean of the all-T bound. 200 repetitions, each 40 images drawn with replacement (at 12 even
    the exact all-T bound's t-interval covers only ~0.89 here: the population is skewed)."""
    s = NoiseSchedule.named("linear", 60)
    population = grid_images(32, seed=1)
    model = one_point(grid_images(1, seed=2), s)
    per_image_truth = nll_bpd(model, s, population)["per_image_bpd"]
    truth = per_image_truth.mean()
    rng = np.random.default_rng(0)
    hits, means = 0, []
    for rep in range(200):
        ids = rng.integers(0, 32, 40)
        est = estimate_bound(model, s, population[ids], ids + 100 * rep, BoundDesign(exact_t=2, draws=8), seed=rep)
        hits += est.total.ci_low <= truth <= est.total.ci_high
        means.append(est.total.mean)
    assert 0.89 <= hits / 200 <= 0.99
    assert abs(mean_estimate(np.array(means)).mean - truth) < 3 * np.std(means) / np.sqrt(200)


def test_common_random_numbers_pair_two_models():
    """Same seed and ids: the same noise and t draws, so a model compared with itself differs by exactly 0,
    and the draws do not depend on chunking."""
    s = NoiseSchedule.named("linear", 40)
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    model = lambda x, t: net(x) * (1 + t.view(-1, 1, 1, 1) / 40)  # noqa: E731
    x0 = grid_images(8)
    d = BoundDesign(exact_t=3, draws=5)
    a = estimate_bound(model, s, x0, np.arange(8), d, seed=4, chunk_size=7)
    b = estimate_bound(model, s, x0, np.arange(8), d, seed=4, chunk_size=64)
    np.testing.assert_allclose(a.per_image, b.per_image, rtol=1e-9)
    c = estimate_bound(model, s, x0, np.arange(8), d, seed=5)
    assert not np.allclose(a.per_image, c.per_image)


def test_a_bound_held_by_the_last_term_is_estimated_tightly():
    """A model whose only error is at t = T (where cosine's clipped beta_T makes lambda_T huge): the exact
    last index gives the all-T value with no sampling noise at all."""
    s = NoiseSchedule.named("cosine", 50)
    c = grid_images(1, seed=3)
    x0 = c.expand(20, -1, -1, -1).clone()
    good = one_point(c, s)  # Bayes-optimal for the one-point data set: every KL term 0 but the last

    def model(x, t):
        return good(x, t) + (t == s.T - 1).view(-1, 1, 1, 1) * 0.5

    ids = np.arange(20)
    full = estimate_bound(model, s, x0, ids, BoundDesign(50, 0), seed=0)
    mc = estimate_bound(model, s, x0, ids, BoundDesign(2, 3), seed=0)
    assert full.terms_bpd[-1] > 0.5 * full.total.mean  # the last term dominates
    assert mc.terms_bpd[-1] == pytest.approx(full.terms_bpd[-1], rel=1e-9)
    assert abs(mc.total.mean - full.total.mean) < 3 * mc.total.stderr


def test_design_checks():
    s = NoiseSchedule.named("linear", 30)
    x0 = grid_images(4)
    for bad in (BoundDesign(0, 5), BoundDesign(30, 2), BoundDesign(5, 0)):
        with pytest.raises(ValueError, match="exact_t|draws"):
            estimate_bound(lambda x, t: x, s, x0, np.arange(4), bad)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        estimate_bound(lambda x, t: x, s, x0 * 3, np.arange(4), BoundDesign(2, 2))


@pytest.mark.slow
def test_mean_over_repetitions_agrees_with_all_t_on_a_trained_model(tmp_path):
    """Noise-dependent terms: a tiny UNet trained briefly on digits. Per image, the importance estimates
    averaged over 30 seeds agree with the all-T estimates averaged over 6 seeds, within a tight interval."""
    from ddpm_core.data import to_model_range
    from ddpm_core.train import TrainConfig, train
    from tests.helpers import digits_images, tiny_schedule, tiny_unet

    s, images = tiny_schedule(), digits_images()
    cfg = TrainConfig(steps=60, batch_size=32, lr=2e-3, warmup_steps=10, checkpoint_every=1000)
    model = train(tiny_unet(), s, images, cfg, tmp_path / "m.pt", progress=False).ema_model.eval()
    x0, ids = to_model_range(images[:16]), np.arange(16)
    full = np.mean([estimate_bound(model, s, x0, ids, BoundDesign(s.T, 0), seed=r).per_image for r in range(6)], 0)
    mc = np.mean([estimate_bound(model, s, x0, ids, BoundDesign(2, 6), seed=100 + r).per_image for r in range(30)], 0)
    diff = mean_estimate(mc - full)
    assert diff.ci_low < 0 < diff.ci_high
    assert diff.ci_high - diff.ci_low < 0.05 * full.mean()  # sharp enough to see a bias of a few percent
