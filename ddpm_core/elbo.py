"""The negative ELBO in bits per dimension (Ho et al. eq. 5; improved DDPM's evaluation).

    -log p(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                                  prior_bpd
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)),  t >= 2  vb_terms_bpd
    L_0     = -log p_theta(x_0 | x_1), the discretized Gaussian decoder      vb_terms_bpd at index 0

Each term is estimated with one draw x_t ~ q(x_t | x_0) per image and t, so the bound costs T network passes
per image. Those passes are batched across (image, t) pairs in chunks, so evaluation runs at the network's
forward speed. Units: bits per dimension = nats / (C * H * W * ln 2), here the per-dimension mean / ln 2.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import EpsModel, Objective, Variance, p_mean_variance, q_mean_variance, q_posterior_mean_variance, q_sample
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import NoiseSchedule

LN2 = math.log(2.0)


def prior_bpd(s: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T in bits/dim per example, shape [N]: independent of the network."""
    t = torch.full((x0.shape[0],), s.T - 1, dtype=torch.long, device=x0.device)
    mean, _, log_var = q_mean_variance(s, x0, t)
    zeros = torch.zeros_like(mean)
    return mean_flat(normal_kl(mean, log_var, zeros, zeros)) / LN2


def vb_terms_bpd(model: EpsModel, s: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 variance: Variance = "fixed_small", objective: Objective = "eps") -> torch.Tensor:
    """L_{t-1} in bits/dim per example, shape [N]: the decoder NLL where t = 0 (t = 1), else the KL."""
    true_mean, _, true_log_var = q_posterior_mean_variance(s, x0, x_t, t)
    p = p_mean_variance(model, s, x_t, t, variance=variance, objective=objective)
    out = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / LN2
    first = t == 0
    if first.any():  # the decoder is only needed where t = 1
        log_p = discretized_gaussian_log_likelihood(x0[first], p["mean"][first], 0.5 * p["log_variance"][first])
        out[first] = (-mean_flat(log_p) / LN2).to(out.dtype)
    return out


@torch.no_grad()
def vb_terms_matrix(model: EpsModel, s: NoiseSchedule, x0: torch.Tensor, variance: Variance = "fixed_small",
                    objective: Objective = "eps", chunk_size: int = 256, generator: torch.Generator | None = None,
                    progress: bool = False) -> torch.Tensor:
    """All T terms for every image, bits/dim, shape [N, T], in chunks of `chunk_size` network passes."""
    n, T = x0.shape[0], s.T
    image_idx = torch.arange(n, device=x0.device).repeat_interleave(T)  # pair p = (p // T, p % T)
    t_idx = torch.arange(T, device=x0.device).repeat(n)
    terms = torch.empty(n * T, dtype=torch.float64, device=x0.device)
    starts = range(0, n * T, chunk_size)
    for start in tqdm(starts, desc="ELBO", unit="chunk", disable=not progress, leave=False):
        sl = slice(start, start + chunk_size)
        x = x0[image_idx[sl]]
        t = t_idx[sl]
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        terms[sl] = vb_terms_bpd(model, s, x, q_sample(s, x, t, noise), t, variance, objective).double()
    return terms.reshape(n, T)


def check_x0(x0: torch.Tensor) -> None:
    if x0.dim() != 4:
        raise ValueError(f"x0 must be [N, C, H, W]; got shape {tuple(x0.shape)}")
    if x0.min() < -1.0 or x0.max() > 1.0:
        raise ValueError("x0 must lie in [-1, 1] (the 8-bit grid 2k/255 - 1)")


def nll_bpd(eps_model: EpsModel, schedule: NoiseSchedule, x0: torch.Tensor, variance: Variance = "fixed_small",
            objective: Objective = "eps", chunk_size: int = 256, generator: torch.Generator | None = None,
            progress: bool = False) -> dict:
    """Negative ELBO of x0 (float tensor [N, C, H, W] on the grid 2k/255 - 1) in bits/dim, batch-averaged.

    Returns total_bpd, prior_bpd, decoder_bpd (floats) and terms_bpd (numpy [T], index 0 = decoder L_0,
    index i = L_i = KL at t = i + 1), with total_bpd = prior_bpd + terms_bpd.sum().
    """
    check_x0(x0)
    terms = vb_terms_matrix(eps_model, schedule, x0, variance, objective, chunk_size, generator, progress)
    prior = prior_bpd(schedule, x0).double()
    per_image = terms.sum(dim=1) + prior
    terms_mean = terms.mean(dim=0).cpu().numpy()
    return {
        "total_bpd": float(per_image.mean()),
        "prior_bpd": float(prior.mean()),
        "decoder_bpd": float(terms_mean[0]),
        "terms_bpd": np.asarray(terms_mean, dtype=np.float64),
        "per_image_bpd": per_image.cpu().numpy(),
    }
