"""DPM-Solver++: parity with diffusers' DPMSolverMultistepScheduler, closed forms, and the step's identities.

Parity (float32 tensors on both sides, the same x_T and noise, the same timesteps): the max abs difference of x_0
over a batch of 8x8 images from the tiny UNet is below 2e-5 times the output's scale (see PARITY_RTOL).
"""

import math

import numpy as np
import pytest
from scipy.integrate import quad
import torch

from ddpm_core.dpm_solver import dpm_solver_sample, dpm_solver_step, dpm_timesteps, solver_grid, step_order
from ddpm_core.sampling import check_sampler, ddim_sample, run_sampler, sample, sample_seeds
from ddpm_core.schedules import NoiseSchedule

from helpers import tiny_unet

# Measured max |ours - diffusers| here (float32; diffusers keeps its schedule in float32, ours is float64 cast at
# use): 1.2e-6 to 9.5e-6 with x_0 clipped (outputs in [-1, 1]); without clipping the untrained network's x_0 reaches
# about 500 and the difference stays below 1e-6 of the largest |x_0| (2.1e-4 to 4.0e-4). Float32 rounding is
# relative, amplified by 1 / alpha_T ~ 160 at the first step: the bound is 2e-5 x max(1, max |x_0|).
PARITY_RTOL = 2e-5


def assert_parity(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == ref.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= PARITY_RTOL * max(1.0, ref.abs().max().item())
SHAPE = (4, 1, 8, 8)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def diffusers_sample(model, s: NoiseSchedule, steps: int, order: int, eta: float, objective: str, clip: bool,
                     seed: int) -> torch.Tensor:
    """diffusers' scheduler driving the same network from the same x_T, with our noise passed in."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=s.T, trained_betas=s.betas, solver_order=order,
        algorithm_type="sde-dpmsolver++" if eta else "dpmsolver++", solver_type="midpoint",
        prediction_type={"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[objective],
        thresholding=clip, dynamic_thresholding_ratio=1.0, sample_max_value=1.0,
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")
    sched.set_timesteps(steps)
    g = gen(seed)
    x = torch.randn(SHAPE, generator=g)
    for i, t in enumerate(sched.timesteps):
        noise = torch.randn(SHAPE, generator=g) if eta and i < steps - 1 else torch.zeros(SHAPE)
        out = model(x, t.expand(SHAPE[0]))
        x = sched.step(out, t, x, variance_noise=noise if eta else None).prev_sample
    return x, sched.timesteps.numpy()


@pytest.fixture(scope="module")
def net():
    return tiny_unet(0).eval()


@pytest.mark.parametrize("schedule,steps,order,objective,clip", [
    ("linear", 10, 2, "eps", False), ("linear", 10, 2, "eps", True), ("cosine", 20, 2, "eps", True),
    ("linear", 10, 3, "eps", False), ("linear", 16, 3, "eps", True), ("linear", 5, 1, "eps", True),
    ("linear", 10, 2, "x0", True), ("cosine", 12, 2, "v", False),
])
def test_matches_diffusers_dpmsolver_plus_plus(net, schedule, steps, order, objective, clip):
    s = NoiseSchedule.named(schedule, 1000)
    ref, timesteps = diffusers_sample(net, s, steps, order, 0.0, objective, clip, seed=3)
    np.testing.assert_array_equal(dpm_timesteps(1000, steps), timesteps)
    with torch.no_grad():
        ours = dpm_solver_sample(net, s, SHAPE, gen(3), steps, order, 0.0, objective, clip)
    assert_parity(ours, ref)


@pytest.mark.parametrize("steps,clip", [(10, False), (20, True)])
def test_the_sde_variant_matches_diffusers_sde_dpmsolver_plus_plus(net, steps, clip):
    s = NoiseSchedule.named("linear", 1000)
    ref, _ = diffusers_sample(net, s, steps, 2, 1.0, "eps", clip, seed=4)
    with torch.no_grad():
        ours = dpm_solver_sample(net, s, SHAPE, gen(4), steps, 2, 1.0, "eps", clip)
    assert_parity(ours, ref)


def test_clipping_changes_the_result(net):
    """The parity cases with clipping on are not vacuous: the tiny network's x0_hat leaves [-1, 1]."""
    s = NoiseSchedule.named("linear", 1000)
    with torch.no_grad():
        a, b = (dpm_solver_sample(net, s, SHAPE, gen(3), 10, 2, 0.0, "eps", clip) for clip in (False, True))
    assert (a - b).abs().max() > 1e-2


def oracle(c: torch.Tensor, s: NoiseSchedule):
    """Bayes-optimal eps for the one-point data set {c} (x0_hat = c at every t)."""
    a = torch.tensor(s.sqrt_alphas_cumprod, dtype=torch.float32)
    b = torch.tensor(s.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)
    return lambda x, t: (x - a[t].view(-1, 1, 1, 1) * c) / b[t].view(-1, 1, 1, 1)


@pytest.mark.parametrize("order,eta", [(1, 0.0), (2, 0.0), (3, 0.0), (2, 1.0), (1, 0.5)])
@pytest.mark.parametrize("steps", [1, 2, 5, 20, 99])
def test_the_exact_model_of_one_point_gives_back_x0_with_any_step_count(order, eta, steps):
    """float32: x0_hat = (x - sigma eps) / alpha rounds at about 1e-7 / alpha_T = 2e-5 at the first step."""
    s = NoiseSchedule.named("linear", 100)
    c = torch.rand(1, 1, 4, 4, generator=gen(9)) * 2 - 1
    x = dpm_solver_sample(oracle(c, s), s, (5, 1, 4, 4), gen(1), steps, order, eta)
    torch.testing.assert_close(x, c.expand_as(x), rtol=0, atol=1e-4)


def test_order_1_is_ddim_on_the_same_grid():
    """(E2) is DDIM with eta = 0, and the first-order SDE step (eta = 1) is DDIM with eta = 1, same noise."""
    s = NoiseSchedule.named("linear", 200)
    kept = dpm_timesteps(200, 8)[::-1].copy()
    abar = s.alphas_cumprod[kept]
    grid = NoiseSchedule.from_betas(1 - abar / np.append(1.0, abar[:-1]), timestep_map=kept)
    model = tiny_unet(2).eval()
    with torch.no_grad():
        for eta in (0.0, 1.0):
            ours = dpm_solver_sample(model, s, SHAPE, gen(5), 8, order=1, eta=eta, clip_x0=True)
            ddim = ddim_sample(model, grid, SHAPE, gen(5), eta=eta, clip_x0=True)
            torch.testing.assert_close(ours, ddim, rtol=0, atol=2e-5)


def test_one_sde_step_with_the_exact_prediction_keeps_q_of_x_t():
    """x_s = alpha_s c + sigma_s eps and x0_hat = c: (E5) gives x_t = alpha_t c + sigma_t (a eps + b z) with
    a^2 + b^2 = 1, for every eta, so x_t ~ q(x_t | c) exactly."""
    s = NoiseSchedule.named("linear", 1000)
    _, alpha, sigma, lam = solver_grid(s, 10)
    c, eps, z = (torch.randn(3, 5, generator=gen(k), dtype=torch.float64) for k in range(3))
    for eta in (0.0, 0.3, 1.0):
        for i in range(len(alpha) - 2):
            x_s = alpha[i] * c + sigma[i] * eps
            x_t = dpm_solver_step(x_s, [c], [lam[i + 1], lam[i]], alpha[i + 1], sigma[i + 1], sigma[i], eta, z)
            h = lam[i + 1] - lam[i]
            a, b = math.exp(-eta * h), math.sqrt(-math.expm1(-2 * eta * h))
            torch.testing.assert_close(x_t, alpha[i + 1] * c + sigma[i + 1] * (a * eps + b * z), rtol=1e-12, atol=1e-12)


def exact_step(x_s: float, x0: callable, lam_s: float, lam_t: float) -> float:
    """(E1) for a given x_theta(lambda), by quadrature: (sigma_t / sigma_s) x_s + sigma_t int e^lambda x_theta."""
    sig = lambda lam: 1 / math.sqrt(1 + math.exp(2 * lam))  # noqa: E731  (sigma from lambda, VP)
    integral = quad(lambda lam: math.exp(lam) * x0(lam), lam_s, lam_t)[0]
    return sig(lam_t) / sig(lam_s) * x_s + sig(lam_t) * integral


@pytest.mark.parametrize("order,x0", [(1, lambda lam: 0.3), (2, lambda lam: 0.3), (3, lambda lam: 0.3 - 0.2 * lam)])
def test_the_step_integrates_what_its_order_can_exactly(order, x0):
    """Constant predictions: every order is exact; predictions linear in lambda: the third-order step is exact."""
    lams = [-0.4, -1.0, -1.5, -2.2][:order + 1]          # lambda_t, lambda_s, older points
    sig = lambda lam: 1 / math.sqrt(1 + math.exp(2 * lam))  # noqa: E731
    alpha_t, sigma_t, sigma_s = sig(lams[0]) * math.exp(lams[0]), sig(lams[0]), sig(lams[1])
    preds = [torch.tensor([x0(lam)], dtype=torch.float64) for lam in lams[1:]]
    x_s = torch.tensor([0.8], dtype=torch.float64)
    got = dpm_solver_step(x_s, preds, lams, alpha_t, sigma_t, sigma_s)
    assert got.item() == pytest.approx(exact_step(0.8, x0, lams[1], lams[0]), rel=1e-10, abs=1e-12)


def test_grid_and_order_schedule():
    np.testing.assert_array_equal(dpm_timesteps(1000, 10), [999, 899, 799, 699, 599, 500, 400, 300, 200, 100])
    assert len(set(dpm_timesteps(50, 49))) == 49
    with pytest.raises(ValueError, match="1 to T - 1 = 49"):
        dpm_timesteps(50, 50)
    assert [step_order(i, 10, 3) for i in range(10)] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [step_order(i, 20, 3) for i in range(20)][-3:] == [3, 3, 1]
    assert [step_order(i, 5, 2) for i in range(5)] == [1, 2, 2, 2, 1]


def test_a_learned_variance_network_is_read_for_its_mean_only(net):
    s = NoiseSchedule.named("linear", 100)
    with_v = lambda x, t: torch.cat([net(x, t), torch.full_like(x, 0.7)], dim=1)  # noqa: E731
    with torch.no_grad():
        a = dpm_solver_sample(with_v, s, SHAPE, gen(2), 7, variance="learned_range")
        b = dpm_solver_sample(net, s, SHAPE, gen(2), 7)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw,message", [
    (dict(sampler="dpm_solver++", eta=1.5, order=2), r"eta = 1.5 is not allowed with dpm_solver\+\+: must be in \[0, 1\]"),
    (dict(sampler="dpm_solver++", eta=0.5, order=3), "eta = 0.5 is not allowed with order = 3"),
    (dict(sampler="dpm_solver++", eta=0.0, order=4), "order = 4 is not allowed: DPM-Solver"),
    (dict(sampler="ddim", eta=0.0, order=3), "order = 3 is not allowed with sampler = 'ddim'"),
    (dict(sampler="ancestral", eta=0.2, order=2), "eta = 0.2 is not allowed with sampler = 'ancestral'"),
    (dict(sampler="plms", eta=0.0, order=2), "unknown sampler 'plms'"),
])
def test_settings_that_are_not_built_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        check_sampler(**kw)


def test_run_sampler_reports_the_network_t_and_changes_nothing():
    s = NoiseSchedule.named("linear", 100)
    c = torch.full((1, 4, 4), 0.5)
    for sampler, steps, expected in (("dpm_solver++", 5, [99, 79, 59, 40, 20]), ("ddim", 5, [99, 74, 50, 25, 0])):
        seen = []
        keep = lambda t, x, x0: seen.append((t, x0.clone()))  # noqa: E731
        a = run_sampler(oracle(c, s), s, (2, 1, 4, 4), gen(1), sampler, steps, on_step=keep)
        assert torch.equal(a, run_sampler(oracle(c, s), s, (2, 1, 4, 4), gen(1), sampler, steps))
        assert [t for t, _ in seen] == expected
        torch.testing.assert_close(seen[-1][1], c.expand(2, -1, -1, -1))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_each_seed_gives_its_image_whatever_it_is_batched_with(net, eta):
    s = NoiseSchedule.named("linear", 100)
    kw = dict(image_shape=(1, 8, 8), sampler="dpm_solver++", steps=6, eta=eta)
    with torch.no_grad():
        x = sample_seeds(net, s, [3, 0, 12, 3], batch_size=3, **kw)
        alone = torch.cat([sample(net, s, n=1, seed=k, progress=False, **kw) for k in (3, 0, 12, 3)])
    # the UNet's kernels round differently at other batch sizes: equal up to float32 rounding
    torch.testing.assert_close(x[0], x[3], rtol=0, atol=1e-5)
    assert (x[0] - x[1]).abs().max() > 0.1
    torch.testing.assert_close(x, alone, rtol=0, atol=1e-5)
