"""The forward process q, its posterior, and the reverse process p_theta (Ho et al. 2020, sections 2-3).

    q(x_t | x_0)            = N(sqrt(abar_t) x_0, (1 - abar_t) I)                        q_mean_variance, q_sample
    q(x_{t-1} | x_t, x_0)   = N(mu_tilde_t, beta_tilde_t I),
        mu_tilde_t = coef1_t x_0 + coef2_t x_t                                           q_posterior_mean_variance
    p(x_{t-1} | x_t)        = N(mu_tilde_t(x_t, x0_hat(x_t, t)), sigma_t^2 I)            p_mean_variance

The network predicts eps (Ho), x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho); every
prediction is turned into x0_hat and then into the posterior mean, so the three objectives share one path.

sigma_t^2 is fixed (fixed_small = beta_tilde_t, fixed_large = beta_t) or learned (improved DDPM eq. 15,
`learned_range`): the network then outputs 2C channels, [prediction | v], and
    log sigma_t^2 = frac log beta_t + (1 - frac) log beta_tilde_t (clipped),  frac = (v + 1) / 2,
so v = -1 gives beta_tilde_t and v = 1 gives beta_t. v is not clamped (improved-diffusion does not either).

`t` is always a long tensor [N] of 0-based indices into the schedule (index 0 is t = 1). Coefficients are
gathered in float64 and cast to the tensor's dtype at use.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch

from .schedules import NoiseSchedule

Objective = Literal["eps", "x0", "v"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
OBJECTIVES = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def extract(arr: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """arr[t] as a tensor broadcastable against x: [N] -> [N, 1, 1, 1], in x's dtype and device."""
    values = torch.tensor(arr, device=t.device)[t].to(x.dtype)
    return values.reshape(-1, *([1] * (x.dim() - 1)))


# --- forward process -----------------------------------------------------------------------------------
def q_mean_variance(s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor):
    """Mean, variance and log-variance of q(x_t | x_0)."""
    mean = extract(s.sqrt_alphas_cumprod, t, x0) * x0
    variance = extract(1.0 - s.alphas_cumprod, t, x0)
    return mean, variance, extract(s.log_one_minus_alphas_cumprod, t, x0)


def q_sample(s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a draw of q(x_t | x_0) by reparameterization."""
    return extract(s.sqrt_alphas_cumprod, t, x0) * x0 + extract(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior_mean_variance(s: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = extract(s.posterior_mean_coef1, t, x_t) * x0 + extract(s.posterior_mean_coef2, t, x_t) * x_t
    variance = extract(s.posterior_variance, t, x_t)
    return mean, variance, extract(s.posterior_log_variance_clipped, t, x_t)


# --- converters between parameterizations ----------------------------------------------------------------
def x0_from_eps(s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (x_t - extract(s.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / extract(s.sqrt_alphas_cumprod, t, x_t)


def eps_from_x0(s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""
    return (x_t - extract(s.sqrt_alphas_cumprod, t, x_t) * x0) / extract(s.sqrt_one_minus_alphas_cumprod, t, x_t)


def v_from_eps_x0(s: NoiseSchedule, t: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
    return extract(s.sqrt_alphas_cumprod, t, x0) * eps - extract(s.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def x0_from_v(s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    return extract(s.sqrt_alphas_cumprod, t, x_t) * x_t - extract(s.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def x0_from_prediction(s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor,
                       objective: Objective) -> torch.Tensor:
    if objective == "eps":
        return x0_from_eps(s, x_t, t, out)
    if objective == "x0":
        return out
    if objective == "v":
        return x0_from_v(s, x_t, t, out)
    raise ValueError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")


def training_target(s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    objective: Objective) -> torch.Tensor:
    """What the network is regressed on under L_simple for each objective."""
    if objective == "eps":
        return noise
    if objective == "x0":
        return x0
    if objective == "v":
        return v_from_eps_x0(s, t, noise, x0)
    raise ValueError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")


# --- reverse process -------------------------------------------------------------------------------------
def p_variance(s: NoiseSchedule, t: torch.Tensor, x: torch.Tensor, variance: Variance):
    """sigma_t^2 and its log: fixed_small = beta_tilde_t (clipped log), fixed_large = beta_t (index 0 = beta_tilde_2).

    A learned variance depends on the network's output: see `learned_range_variance`.
    """
    if variance == "fixed_small":
        return extract(s.posterior_variance, t, x), extract(s.posterior_log_variance_clipped, t, x)
    if variance == "fixed_large":
        large = s.fixed_large_variance
        return extract(large, t, x), extract(np.log(large), t, x)
    if variance == "learned_range":
        raise ValueError("variance 'learned_range' comes from the network's output: use p_mean_variance "
                         "or learned_range_variance")
    raise ValueError(f"unknown variance '{variance}'; choose one of {', '.join(VARIANCES)}")


def learned_range_variance(s: NoiseSchedule, t: torch.Tensor, v: torch.Tensor):
    """sigma_t^2 and its log from the network's v (improved DDPM eq. 15), elementwise, shape of v.

    log sigma_t^2 = frac log beta_t + (1 - frac) posterior_log_variance_clipped_t, frac = (v + 1) / 2.
    """
    frac = (v + 1.0) / 2.0
    log_var = frac * extract(np.log(s.betas), t, v) + (1.0 - frac) * extract(s.posterior_log_variance_clipped, t, v)
    return torch.exp(log_var), log_var


def output_channels(image_channels: int, variance: Variance) -> int:
    """The network's output width: the prediction, plus v per channel when the variance is learned."""
    return 2 * image_channels if variance == "learned_range" else image_channels


def split_output(out: torch.Tensor, image_channels: int, variance: Variance) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, C or 2C, H, W] -> (prediction [N, C, H, W], v [N, C, H, W] or None for a fixed variance)."""
    expected = output_channels(image_channels, variance)
    if out.shape[1] != expected:
        raise ValueError(f"variance '{variance}' needs a network with {expected} output channels for "
                         f"{image_channels}-channel images; got {out.shape[1]}")
    if variance == "learned_range":
        return out[:, :image_channels], out[:, image_channels:]
    return out, None


def model_t(s: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """The original t index the network sees (differs from t only on a respaced schedule)."""
    return torch.tensor(s.timestep_map, device=t.device)[t]


def predict_x0(model: EpsModel, s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, variance: Variance,
               objective: Objective, clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x0_hat [N, C, H, W], the learned-variance v or None): one network pass, the prediction turned into x_0
    and, with clip_x0, clipped to [-1, 1]."""
    out = model(x_t, model_t(s, t)).to(x_t.dtype)
    pred, v = split_output(out, x_t.shape[1], variance)
    x0_hat = x0_from_prediction(s, x_t, t, pred, objective)
    return (x0_hat.clamp(-1.0, 1.0) if clip_x0 else x0_hat), v


def data_prediction(model: EpsModel, s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, variance: Variance,
                    objective: Objective, clip_x0: bool) -> torch.Tensor:
    """x_theta(x_t, t): the mean part of the network's output as x0_hat (a learned variance is not used)."""
    return predict_x0(model, s, x_t, t, variance, objective, clip_x0)[0]


def p_mean_variance(model: EpsModel, s: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor,
                    variance: Variance = "fixed_small", objective: Objective = "eps",
                    clip_x0: bool = False) -> dict[str, torch.Tensor]:
    """Mean and variance of p_theta(x_{t-1} | x_t), with the network's x_0 and eps predictions.

    With variance 'learned_range' the model returns [N, 2C, H, W]; the first C channels are the prediction
    (`objective`), the last C give the log-variance (returned per element, shape of x_t, with `v`).
    """
    x0_hat, v = predict_x0(model, s, x_t, t, variance, objective, clip_x0)
    mean, _, _ = q_posterior_mean_variance(s, x0_hat, x_t, t)
    var, log_var = p_variance(s, t, x_t, variance) if v is None else learned_range_variance(s, t, v)
    result = {"mean": mean, "variance": var, "log_variance": log_var, "pred_x0": x0_hat,
              "pred_eps": eps_from_x0(s, x_t, t, x0_hat)}
    if v is not None:
        result["v"] = v
    return result
