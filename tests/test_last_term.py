"""The t = T term as evaluate keeps it: each image's exact draw of L_{T-1} inside its bound estimate, so the
bound minus the column is the bound without that term, image by image (issue 23)."""

import numpy as np
import pytest
import torch

from ddpm_core.diffusion import q_sample
from ddpm_core.elbo import prior_bpd, vb_terms_bpd
from ddpm_core.elbo_mc import SEED_STRIDE, BoundDesign, estimate_bound
from ddpm_core.schedules import NoiseSchedule
from ddpm_core.stats import grouped_mean_estimate, mean_estimate
from tests.test_elbo_mc import grid_images

SEED = 3


def noisy_model(T: int):
    """A network whose terms depend on the noise draw: the column is only right if it is the bound's own draw."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    return lambda x, t: net(x) * (1 + t.view(-1, 1, 1, 1) / T)


def own_terms(model, s, x0: torch.Tensor, image_id: int, ts: list[int]) -> list[float]:
    """Terms at indices ts, in that order, each with the next draw of the image's own generator (as evaluate)."""
    g = torch.Generator().manual_seed(SEED * SEED_STRIDE + image_id)
    out = []
    with torch.no_grad():
        for i in ts:
            noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            t = torch.tensor([i])
            out.append(float(vb_terms_bpd(model, s, x0[None], q_sample(s, x0[None], t, noise[None]), t)))
    return out


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_all_t_bound_minus_the_column_is_the_bound_without_its_t_T_term(schedule):
    s = NoiseSchedule.named(schedule, 24)
    model, x0, ids = noisy_model(24), grid_images(5, seed=1), np.arange(5) + 11
    est = estimate_bound(model, s, x0, ids, BoundDesign(24, 0), seed=SEED, chunk_size=7)
    prior = prior_bpd(s, x0).double().numpy()
    for j, image_id in enumerate(ids):
        terms = own_terms(model, s, x0[j], int(image_id), list(range(24)))
        assert est.last_term[j] == pytest.approx(terms[-1], rel=1e-9)
        assert est.per_image[j] - est.last_term[j] == pytest.approx(prior[j] + sum(terms[:-1]), rel=1e-9)
    assert est.terms_bpd[-1] == pytest.approx(est.last_term.mean(), rel=1e-12)  # the bound's own per-t term
    rest = est.without_last_term()
    assert rest.mean == pytest.approx(est.total.mean - est.last_term.mean(), rel=1e-12)
    assert rest == mean_estimate(est.per_image - est.last_term)  # all-T: one group, as the total
    assert est.last_term_estimate() == mean_estimate(est.last_term)


def test_importance_bound_keeps_the_same_draw_of_the_t_T_term():
    """The importance design evaluates t = T exactly after the exact_t smallest indices: the column is that
    slot's draw, the per-t term at T its mean, and the bound without it is grouped by phase as the total is."""
    s = NoiseSchedule.named("cosine", 40)
    model, x0, ids = noisy_model(40), grid_images(12, seed=2), np.arange(12)
    design = BoundDesign(exact_t=3, draws=4)
    est = estimate_bound(model, s, x0, ids, design, seed=SEED)
    for j, image_id in enumerate(ids):
        *_, last = own_terms(model, s, x0[j], int(image_id), [0, 1, 2, 39])
        assert est.last_term[j] == pytest.approx(last, rel=1e-9)
    assert est.terms_bpd[-1] == pytest.approx(est.last_term.mean(), rel=1e-12)
    rest = est.per_image - est.last_term
    assert est.without_last_term() == grouped_mean_estimate([rest[est.phase == 0], rest[est.phase == 1]])
    assert len(set(est.phase)) == 2
