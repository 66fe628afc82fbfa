"""The figures stage: its PNGs are written from the library, its paths agree with dvc.yaml, lambda_t is Ho's."""

import numpy as np
import pytest
import torch

from ddpm_core.diffusion import q_posterior_mean_variance, q_sample, x0_from_eps
from ddpm_core.losses import mean_flat, normal_kl
from ddpm_core.schedules import NoiseSchedule
from pipeline import figures, paths, reports

from helpers import digits_images, tiny_unet
from project import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sampler,order", [("ddim", 2), ("dpm_solver++", 2)])
def test_draw_all_writes_every_figure(tmp_path, sampler, order):
    cfg = {"sampler": sampler, "steps": 6, "eta": 0.0, "order": order, "clip_x0": True, "seed": 0}
    image = digits_images()[0].numpy()
    with torch.no_grad():
        written = figures.draw_all(tiny_unet().eval(), NoiseSchedule.named("linear", 40), "linear", image, cfg,
                                   "fixed_small", "eps", "cpu", tmp_path)
    assert [p.name for p in written] == [p.name for p in paths.FIGURE_FILES]
    for p in written:
        assert p.read_bytes()[:8] == PNG, p


def test_the_denoising_strip_follows_the_sampler_steps():
    """dpm_solver++ at 6 evaluations on T = 40: the strip shows its grid (1-based t) and its x0_hat."""
    s = NoiseSchedule.named("linear", 40)
    cfg = {"sampler": "dpm_solver++", "steps": 6, "eta": 0.0, "order": 2, "clip_x0": True, "seed": 0}
    with torch.no_grad():
        seen, final = figures.sampling_trajectory(tiny_unet().eval(), s, 2, (1, 8, 8), cfg, "eps", "fixed_small", "cpu")
    assert [t for t, _, _ in seen] == [40, 33, 27, 21, 14, 7]  # round(linspace(0, 39, 7)), half to even, + 1
    assert final.shape == (2, 1, 8, 8) and torch.equal(final, seen[-1][2].clamp(-1, 1))


def test_bpd_plot_with_cumulative_share(tmp_path):
    terms = np.array([1.3, 0.5, 0.2] + [1e-3] * 47)
    reports.plot_bpd_per_t(terms, tmp_path / "bpd.png", "test")
    assert (tmp_path / "bpd.png").read_bytes()[:8] == PNG


def test_figure_paths_are_plots_of_the_figures_stage_and_deps_of_evaluate():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    plots = [next(iter(p)) for p in stages["figures"]["plots"]]
    assert plots == [str(p) for p in paths.FIGURE_FILES]
    assert all(p["cache"] is False for entry in stages["figures"]["plots"] for p in entry.values())
    assert set(plots) <= set(stages["evaluate"]["deps"])


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_lambda_times_squared_eps_error_is_the_kl_mean_term(variance):
    """KL(q(x_{t-1}|x_t,x_0) || p) - (its value at a perfect eps) = lambda_t ||eps - eps_hat||^2 per dim, t >= 2."""
    from ddpm_core.diffusion import p_variance

    s = NoiseSchedule.named("cosine", 60)
    lam = figures.loss_weights(s, variance)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((59, 1, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    eps, err = (torch.randn(x0.shape, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.arange(1, 60)
    x_t = q_sample(s, x0, t, eps)
    true_mean, _, true_log_var = q_posterior_mean_variance(s, x0, x_t, t)
    _, log_var = p_variance(s, t, x_t, variance)

    def kl(eps_hat):
        mean, _, _ = q_posterior_mean_variance(s, x0_from_eps(s, x_t, t, eps_hat), x_t, t)
        return mean_flat(normal_kl(true_mean, true_log_var, mean, log_var))

    expected = torch.from_numpy(lam) * mean_flat(err**2)
    torch.testing.assert_close(kl(eps + err) - kl(eps), expected, rtol=1e-8, atol=1e-12)
