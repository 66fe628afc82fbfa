"""Losses: the closed-form Gaussian KL, the discretized Gaussian decoder, and L_simple.

All log-likelihoods here are in nats; elbo.py converts to bits per dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .diffusion import Objective, EpsModel, q_sample, training_target, model_t
from .schedules import NoiseSchedule

BIN_HALF_WIDTH = 1.0 / 255.0  # data on the 8-bit grid 2k/255 - 1: bins of width 2/255
EDGE = 0.999  # x below -EDGE (above +EDGE) is the first (last) bin, which takes the open tail
MIN_PROB = 1e-12


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x), exact (improved-diffusion uses a tanh approximation)."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element for the decoder p(x_0 | x_1): N(mean, e^{2 log_scale}) integrated over x's bin.

    x must lie on the 8-bit grid in [-1, 1]. Interior bins are [x - 1/255, x + 1/255]; the edge bins take
    (-inf, -1 + 1/255] and [1 - 1/255, inf), so the 256 probabilities of a pixel sum to 1. Computed in float64
    and clamped at 1e-12 before the log.
    """
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (x - mean + BIN_HALF_WIDTH))
    cdf_min = standard_normal_cdf(inv_std * (x - mean - BIN_HALF_WIDTH))
    # 1 - Phi(z) = Phi(-z): keeps the upper tail accurate where Phi(z) rounds to 1.
    upper_tail = standard_normal_cdf(-inv_std * (x - mean - BIN_HALF_WIDTH))
    prob = torch.where(x < -EDGE, cdf_plus, torch.where(x > EDGE, upper_tail, cdf_plus - cdf_min))
    return torch.log(prob.clamp(min=MIN_PROB))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.dim())))


def l_simple(model: EpsModel, s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             objective: Objective = "eps") -> torch.Tensor:
    """Ho's L_simple per example: || target - net(x_t, t) ||^2 averaged over dimensions, shape [N]."""
    x_t = q_sample(s, x0, t, noise)
    out = model(x_t, model_t(s, t))
    target = training_target(s, x0, t, noise, objective)
    return mean_flat(F.mse_loss(out.float(), target.float(), reduction="none"))
