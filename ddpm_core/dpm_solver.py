"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): a multistep exponential integrator of the diffusion ODE
in its data-prediction form, with the SDE variant for eta > 0.

Glossary (code name = paper symbol; x_t = alpha_t x_0 + sigma_t eps, as in q_sample):
    alpha           alpha_t = sqrt(abar_t)
    sigma           sigma_t = sqrt(1 - abar_t)
    lambdas         lambda_t = log(alpha_t / sigma_t), half the log-SNR; it grows as t falls
    h               h_i = lambda_{t_i} - lambda_{t_{i-1}} > 0, one step in lambda
    x0_hats         x_theta(x_{t_j}, t_j), the network's data predictions, newest first (clipped with clip_x0)
    D0, D1, D2      the predictions' value, h x_theta' and (h^2 / 2) x_theta'' in lambda, by finite differences

Written in lambda, the probability-flow ODE is linear in x apart from x_theta: d(x / sigma)/dlambda = e^lambda x_theta.
Its exact solution from s to t (DPM-Solver++'s data-prediction counterpart of DPM-Solver's eq. (3.4)) is
    (E1)  x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_theta(x_lambda, lambda) dlambda.
Replacing x_theta by a polynomial in lambda through the last k predictions and integrating exactly gives order k:
    (E2)  k = 1:  x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D0                      (DDIM with eta = 0)
    (E3)  k = 2:  ... + (1/2) alpha_t (1 - e^{-h}) D1,   D1 = (D0 - x0_hat_{i-2}) / r,  r = h_{i-1} / h_i
                  (Algorithm 2, DPM-Solver++(2M); diffusers' solver_type "midpoint")
    (E4)  k = 3:  ... + alpha_t (1 - (1 - e^{-h}) / h) D1 + alpha_t (1/2 - (h - 1 + e^{-h}) / h^2) D2
                  (the 3M step of Lu et al.'s code and of diffusers; D1, D2 from three predictions)
The D2 coefficient of (E4) is the reference code's. It is half the exact Taylor term: integrating
(h^2/2) x_theta'' exactly would give 1 - 2/h + 2 (1 - e^{-h}) / h^2. Parity with the reference is kept.

SDE variant (eta in (0, 1]; eta = 1 is diffusers' "sde-dpmsolver++", the DPM-Solver++(2M) SDE): the reverse SDE
family whose noise has variance eta times that of the reverse diffusion has, with c = 1 + eta, the solution
    (E5)  x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t (1 - e^{-c h}) D0 [+ (1/2) alpha_t (1 - e^{-c h}) D1]
                + sigma_t sqrt(1 - e^{-2 eta h}) z,
orders 1 and 2 (k-diffusion's eta). At eta = 1 the first-order step is DDIM with eta = 1, the ancestral step.

The step grid is diffusers' "linspace": N network evaluations at t_i = round(linspace(0, T - 1, N + 1))[::-1][:-1]
(0-based indices, so the last evaluation is at index round((T - 1) / N)), and a final step to sigma = 0, which
returns the last data prediction. N <= T - 1 keeps the indices distinct. The order drops on the last steps as in
diffusers (lower_order_final, final_sigmas_type "zero"): first order on the last step, at most second order on
the one before when N < 15, and the first steps warm up (step i has at most i + 1 predictions).
Coefficients are computed in float64 (Python floats) and cast at use.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import EpsModel, Objective, Variance, data_prediction
from .noise import Generators, randn
from .schedules import NoiseSchedule

ORDERS = (1, 2, 3)
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def check_solver(order: int, eta: float, names: dict[str, str] | None = None) -> None:
    """The orders and noise levels that are built; ValueError otherwise (`names`: what to call order and eta)."""
    n = {"order": "order", "eta": "eta", **(names or {})}
    if order not in ORDERS:
        raise ValueError(f"{n['order']} = {order!r} is not allowed: DPM-Solver++ has order 1, 2 or 3")
    if not 0 <= eta <= 1:
        raise ValueError(f"{n['eta']} = {eta!r} is not allowed with dpm_solver++: must be in [0, 1] (0: the ODE, "
                         f"1: the SDE)")
    if order == 3 and eta > 0:
        raise ValueError(f"{n['eta']} = {eta!r} is not allowed with {n['order']} = 3: the SDE variant is built for "
                         f"orders 1 and 2 (no third-order SDE step)")


def dpm_timesteps(T: int, steps: int) -> np.ndarray:
    """The `steps` 0-based indices the network is evaluated at, descending (diffusers' "linspace" spacing)."""
    if not 1 <= steps <= T - 1:
        raise ValueError(f"DPM-Solver++ takes 1 to T - 1 = {T - 1} steps on this grid; got {steps}")
    return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


def step_order(i: int, n: int, order: int) -> int:
    """The order of step i of n: warm-up at the start, lower order at the end (as diffusers)."""
    k = min(order, i + 1)
    if i == n - 1:
        return 1
    if i == n - 2 and n < 15:
        return min(k, 2)
    return k


def dpm_solver_step(x: torch.Tensor, x0_hats: Sequence[torch.Tensor], lambdas: Sequence[float], alpha_t: float,
                    sigma_t: float, sigma_s: float, eta: float = 0.0,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """x at lambdas[0] from x at lambdas[1], by (E2)-(E5) of the module docstring.

    x0_hats: the last k data predictions, newest first (k = the order); lambdas: [lambda_t, lambda_s,
    lambda_{s-1}, ...], k + 1 floats. sigma_t = 0 (the final step) returns x0_hats[0], the limit h -> inf.
    """
    k = len(x0_hats)
    if sigma_t == 0.0:
        return x0_hats[0]
    h = lambdas[0] - lambdas[1]
    phi = -math.expm1(-(1.0 + eta) * h)                       # 1 - e^{-c h}
    d0 = x0_hats[0]
    out = (sigma_t / sigma_s * math.exp(-eta * h)) * x + (alpha_t * phi) * d0
    if k == 2:
        r0 = (lambdas[1] - lambdas[2]) / h
        out = out + (0.5 * alpha_t * phi / r0) * (d0 - x0_hats[1])                                   # (E3)
    elif k == 3:
        r0, r1 = (lambdas[1] - lambdas[2]) / h, (lambdas[2] - lambdas[3]) / h
        d1_0, d1_1 = (d0 - x0_hats[1]) / r0, (x0_hats[1] - x0_hats[2]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        out = out + (alpha_t * (1.0 - phi / h)) * d1 + (alpha_t * (0.5 - (h - phi) / h**2)) * d2           # (E4)
    if eta > 0:
        out = out + (sigma_t * math.sqrt(-math.expm1(-2.0 * eta * h))) * noise                             # (E5)
    return out


def solver_grid(s: NoiseSchedule, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t indices [N], alpha [N + 1], sigma [N + 1], lambda [N + 1]) in float64, the last entry the final
    point sigma = 0 (alpha = 1, lambda = inf)."""
    ts = dpm_timesteps(s.T, steps)
    abar = s.alphas_cumprod[ts]
    alpha, sigma = np.append(np.sqrt(abar), 1.0), np.append(np.sqrt(1.0 - abar), 0.0)
    with np.errstate(divide="ignore"):
        lambdas = np.log(alpha) - np.log(sigma)
    return ts, alpha, sigma, lambdas


@torch.no_grad()
def dpm_solver_sample(model: EpsModel, s: NoiseSchedule, shape: tuple[int, ...], generator: Generators, steps: int,
                      order: int = 2, eta: float = 0.0, objective: Objective = "eps", clip_x0: bool = False,
                      device: torch.device | str = "cpu", progress: bool = False, variance: Variance = "fixed_small",
                      on_step: StepCallback | None = None) -> torch.Tensor:
    """DPM-Solver++ from x_T ~ N(0, I) with `steps` network evaluations on the full schedule `s`.

    The multistep history (the last `order` data predictions) lives in this loop, not in an object. Only the
    mean part of a learned-variance network is used. on_step(t, x_t, x0_hat) gets the 0-based index t into s.
    """
    check_solver(order, eta)
    ts, alpha, sigma, lambdas = solver_grid(s, steps)
    x = randn(shape, generator, device)
    history: list[torch.Tensor] = []
    for i in tqdm(range(len(ts)), desc=f"dpm_solver++({order})", unit="step", disable=not progress, leave=False):
        t = torch.full((shape[0],), int(ts[i]), dtype=torch.long, device=device)
        x0_hat = data_prediction(model, s, x, t, variance, objective, clip_x0)
        if on_step is not None:
            on_step(int(ts[i]), x, x0_hat)
        history = [x0_hat, *history][:order]
        k = step_order(i, len(ts), order)
        noise = randn(shape, generator, device) if eta > 0 and sigma[i + 1] > 0 else None
        lam = [float(lambdas[i + 1 - j]) for j in range(k + 1)]  # lambda_t, lambda_s, lambda_{s-1}, ...
        x = dpm_solver_step(x, history[:k], lam, float(alpha[i + 1]), float(sigma[i + 1]), float(sigma[i]), eta, noise)
    return x
