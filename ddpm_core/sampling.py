"""Samplers: ancestral (Ho's Algorithm 2), respaced to K < T steps, DDIM(eta), and DPM-Solver++ (dpm_solver.py).

The sampler never owns the network. Every sampler draws x_T first and then one noise tensor per step that
adds noise, all from one seeded generator, so a sample is a function of (network, schedule, seed). Given a
list of generators, one per row, row i draws only from generator i: `sample_seeds` gives each image its own
seed, so an image does not depend on the others it is batched with.
DDIM with eta = 1 on the full grid draws the same noise as ancestral sampling and gives the same result.
`steps` counts network evaluations for every sampler: ancestral and DDIM run on the respaced schedule of that
many steps (`respace`), DPM-Solver++ on its own grid of the full schedule (at most T - 1 steps).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import EpsModel, Objective, Variance, extract, p_mean_variance
from .dpm_solver import check_solver, dpm_solver_sample
from .noise import Generators, randn
from .schedules import NoiseSchedule, respace

Sampler = Literal["ancestral", "ddim", "dpm_solver++"]
SAMPLERS = ("ancestral", "ddim", "dpm_solver++")
DEFAULT_ORDER = 2  # DPM-Solver++(2M); ancestral and ddim take no order
# on_step(i, x_t, x0_hat): called once per step, before the update, with the 0-based index i into the
# sampler's schedule, the current x_t and the predicted x_0 [N, C, H, W]; it must not modify them.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def max_steps(sampler: Sampler, T: int) -> int:
    """The most network evaluations a sampler takes on a T-step schedule (DPM-Solver++'s grid has T - 1)."""
    return T - 1 if sampler == "dpm_solver++" else T


def check_sampler(sampler: str, eta: float, order: int, names: dict[str, str] | None = None) -> None:
    """The sampler settings that are built, the one place this rule is written; ValueError otherwise. `names`
    says what to call the settings in the message (params passes its keys, e.g. 'sample.eta')."""
    n = {"sampler": "sampler", "eta": "eta", "order": "order", **(names or {})}
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown {n['sampler']} '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    if sampler == "ancestral" and eta != 0:
        raise ValueError(f"{n['eta']} = {eta} is not allowed with {n['sampler']} = 'ancestral': eta is a setting "
                         f"of ddim and dpm_solver++, leave it at 0")
    if sampler != "dpm_solver++" and order != DEFAULT_ORDER:
        raise ValueError(f"{n['order']} = {order} is not allowed with {n['sampler']} = {sampler!r}: order is a "
                         f"dpm_solver++ setting, leave it at {DEFAULT_ORDER}")
    if sampler == "dpm_solver++":
        check_solver(order, eta, {"eta": n["eta"], "order": n["order"]})


def seeded_generator(seed: int, batch: int, device: torch.device | str) -> torch.Generator:
    """The generator of batch `batch` of a run with `seed`: sample()'s batches and sample_seeds()'s rows."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch)


def _steps(s: NoiseSchedule, progress: bool, desc: str):
    return tqdm(range(s.T - 1, -1, -1), desc=desc, unit="step", disable=not progress, leave=False)


@torch.no_grad()
def ancestral_sample(model: EpsModel, s: NoiseSchedule, shape: tuple[int, ...], generator: Generators,
                     variance: Variance = "fixed_small", objective: Objective = "eps", clip_x0: bool = False,
                     device: torch.device | str = "cpu", progress: bool = False,
                     on_step: StepCallback | None = None) -> torch.Tensor:
    """Algorithm 2: x_T ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at the last step."""
    x = randn(shape, generator, device)
    for i in _steps(s, progress, "ancestral"):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        p = p_mean_variance(model, s, x, t, variance=variance, objective=objective, clip_x0=clip_x0)
        if on_step is not None:
            on_step(i, x, p["pred_x0"])
        x = p["mean"]
        if i > 0:
            x = x + torch.exp(0.5 * p["log_variance"]) * randn(shape, generator, device)
    return x


def ddim_coefficients(s: NoiseSchedule, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigma, c) per index for DDIM, float64 [T]: sigma_t as below and c_t = sqrt(1 - abar_prev - sigma_t^2),
    the coefficient of eps_hat (clamped at 0 against rounding). sigma is 0 at index 0 (abar_prev = 1)."""
    abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    return sigma, np.sqrt(np.clip(1 - abar_prev - sigma**2, 0.0, None))


@torch.no_grad()
def ddim_sample(model: EpsModel, s: NoiseSchedule, shape: tuple[int, ...], generator: Generators,
                eta: float = 0.0, objective: Objective = "eps", clip_x0: bool = False,
                device: torch.device | str = "cpu", progress: bool = False,
                variance: Variance = "fixed_small", on_step: StepCallback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on the steps of `s`:

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma  = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev).
    DDIM uses only the mean part of the network: `variance` only says how wide its output is (a
    'learned_range' network's v channels are ignored).
    """
    sigmas, eps_coefs = ddim_coefficients(s, eta)  # float64, cast at use like every schedule array
    sqrt_abar_prev = np.sqrt(s.alphas_cumprod_prev)
    x = randn(shape, generator, device)
    for i in _steps(s, progress, f"ddim(eta={eta})"):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        p = p_mean_variance(model, s, x, t, variance=variance, objective=objective, clip_x0=clip_x0)
        if on_step is not None:
            on_step(i, x, p["pred_x0"])
        x = extract(sqrt_abar_prev, t, x) * p["pred_x0"] + extract(eps_coefs, t, x) * p["pred_eps"]
        if i > 0:
            x = x + extract(sigmas, t, x) * randn(shape, generator, device)
    return x


def run_sampler(model: EpsModel, schedule: NoiseSchedule, shape: tuple[int, ...], generator: Generators,
                sampler: Sampler = "ancestral", steps: int | None = None, eta: float = 0.0,
                order: int = DEFAULT_ORDER, variance: Variance = "fixed_small", objective: Objective = "eps",
                clip_x0: bool = True, device: torch.device | str = "cpu", progress: bool = False,
                on_step: StepCallback | None = None) -> torch.Tensor:
    """One batch [shape] with the named sampler and `steps` network evaluations (None: the most it takes).

    Here on_step(t, x_t, x0_hat) gets t, the 0-based index into `schedule` the network sees, for every sampler.
    """
    check_sampler(sampler, eta, order)
    steps = max_steps(sampler, schedule.T) if steps is None else steps
    if sampler == "dpm_solver++":
        return dpm_solver_sample(model, schedule, shape, generator, steps, order, eta, objective, clip_x0, device,
                                 progress, variance, on_step)
    s = schedule if steps == schedule.T else respace(schedule, steps)
    seen = None if on_step is None else (lambda i, x, x0: on_step(int(s.timestep_map[i]), x, x0))
    if sampler == "ancestral":
        return ancestral_sample(model, s, shape, generator, variance, objective, clip_x0, device, progress, seen)
    return ddim_sample(model, s, shape, generator, eta, objective, clip_x0, device, progress, variance, seen)


def sample(model: EpsModel, schedule: NoiseSchedule, n: int, image_shape: tuple[int, int, int], seed: int,
           sampler: Sampler = "ancestral", steps: int | None = None, eta: float = 0.0, batch_size: int = 256,
           variance: Variance = "fixed_small", objective: Objective = "eps", clip_x0: bool = True,
           device: torch.device | str = "cpu", progress: bool = True, order: int = DEFAULT_ORDER) -> torch.Tensor:
    """n samples in [-1, 1], shape [n, C, H, W], with `steps` network evaluations (None = the most), in batches.

    Batch b draws from a generator seeded from (seed, b): the same seed and batch_size give the same samples,
    and the first batches do not change when more samples are asked for.
    """
    check_sampler(sampler, eta, order)
    out = []
    batches = range(0, n, batch_size)
    for b, start in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=not progress)):
        shape = (min(batch_size, n - start), *image_shape)
        x = run_sampler(model, schedule, shape, seeded_generator(seed, b, device), sampler, steps, eta, order,
                        variance, objective, clip_x0, device, progress)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def sample_seeds(model: EpsModel, schedule: NoiseSchedule, seeds: Sequence[int], image_shape: tuple[int, int, int],
                 sampler: Sampler = "ancestral", steps: int | None = None, eta: float = 0.0, batch_size: int = 256,
                 variance: Variance = "fixed_small", objective: Objective = "eps", clip_x0: bool = True,
                 device: torch.device | str = "cpu", order: int = DEFAULT_ORDER) -> torch.Tensor:
    """One sample per seed in [-1, 1], [len(seeds), C, H, W]: image i is `sample(..., n=1, seed=seeds[i])`
    (its own generator), batched `batch_size` rows at a time for speed."""
    check_sampler(sampler, eta, order)
    out = []
    for start in range(0, len(seeds), batch_size):
        gens = [seeded_generator(int(seed), 0, device) for seed in seeds[start:start + batch_size]]
        x = run_sampler(model, schedule, (len(gens), *image_shape), gens, sampler, steps, eta, order, variance,
                        objective, clip_x0, device)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.empty(0, *image_shape)
