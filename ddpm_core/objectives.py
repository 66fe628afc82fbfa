"""Training objectives: L_simple, improved DDPM's hybrid and variational losses, and Min-SNR-gamma weighting.

    simple   L_simple = || target - net_pred(x_t, t) ||^2, mean over dimensions           (Ho et al. eq. 14)
    hybrid   L_simple + (T / 1000) L_t                                                      (improved DDPM eq. 16)
             L_t in bits/dim from the network's output with the prediction half detached, so it trains only
             the variance half v; lambda = 0.001 on L_vlb = sum over the T terms. This is improved-diffusion's
             LossType.RESCALED_MSE with learned sigmas.
    vlb      T * L_t: an unbiased one-term estimate (t uniform) of the bound minus the prior L_T, in bits/dim,
             training both halves. This is improved-diffusion's LossType.RESCALED_KL (what its `--use_kl True`
             selects); its plain LossType.KL is L_t alone, 1/T of this, which changes only the gradient scale.

L_t is the KL term at t >= 2 and the discretized decoder NLL at t = 1 (index 0), as in the ELBO (elbo.py).

Min-SNR-gamma (Hang et al. 2023) weights the regression term by a function of SNR_t = abar_t / (1 - abar_t):
    eps: min(SNR, gamma) / SNR      x0: min(SNR, gamma)      v: min(SNR, gamma) / (SNR + 1)
Under `hybrid` only the L_simple term is weighted; `vlb` is a bound and is never reweighted.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .diffusion import EpsModel, Objective, Variance, model_t, q_sample, split_output, training_target
from .elbo import vb_terms_bpd
from .losses import mean_flat
from .schedules import NoiseSchedule

Loss = Literal["simple", "hybrid", "vlb"]
LossWeighting = Literal["none", "min_snr"]
LOSSES = ("simple", "hybrid", "vlb")
LOSS_WEIGHTINGS = ("none", "min_snr")
HYBRID_LAMBDA_T = 1000.0  # the vb term is scaled by T / 1000: lambda = 0.001 on the sum of T terms


def check_objective(loss: Loss, variance: Variance, weighting: LossWeighting,
                    names: dict[str, str] | None = None) -> None:
    """The combinations that train something sensible: the one place this rule is written. `names` says what
    to call the three settings in the message (the params check passes its keys, e.g. 'train.loss')."""
    n = {"loss": "loss", "variance": "variance", "weighting": "loss_weighting", **(names or {})}
    if loss not in LOSSES:
        raise ValueError(f"unknown {n['loss']} '{loss}'; choose one of {', '.join(LOSSES)}")
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown {n['weighting']} '{weighting}'; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    if loss in ("hybrid", "vlb") and variance != "learned_range":
        raise ValueError(f"{n['loss']} = {loss!r} is not allowed with {n['variance']} = {variance!r}: it trains "
                         f"the variance, set {n['variance']} = 'learned_range'")
    if loss == "simple" and variance == "learned_range":
        raise ValueError(f"{n['variance']} = 'learned_range' is not allowed with {n['loss']} = 'simple': L_simple "
                         f"gives the variance no gradient, use {n['loss']} = 'hybrid' or 'vlb'")
    if loss == "vlb" and weighting != "none":
        raise ValueError(f"{n['weighting']} = {weighting!r} is not allowed with {n['loss']} = 'vlb': the bound is "
                         f"never reweighted, use 'none'")


def min_snr_weight(s: NoiseSchedule, t: torch.Tensor, objective: Objective, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight of each example's regression loss, float64 [N] (formulas in the module docstring)."""
    ratio = s.alphas_cumprod / (1.0 - s.alphas_cumprod)
    clipped = np.minimum(ratio, gamma)
    if objective == "eps":
        w = clipped / ratio
    elif objective == "x0":
        w = clipped
    elif objective == "v":
        w = clipped / (ratio + 1.0)
    else:
        raise ValueError(f"unknown objective '{objective}'")
    return torch.from_numpy(w).to(t.device)[t]


def training_losses(model: EpsModel, s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    objective: Objective = "eps", variance: Variance = "fixed_small", loss: Loss = "simple",
                    weighting: LossWeighting = "none", min_snr_gamma: float = 5.0) -> torch.Tensor:
    """The per-example training loss, shape [N] (before any importance weight of t)."""
    x_t = q_sample(s, x0, t, noise)
    out = model(x_t, model_t(s, t))
    pred, v = split_output(out, x0.shape[1], variance)
    if loss == "vlb":
        return vb_terms_bpd(lambda *_: out, s, x0, x_t, t, variance, objective) * s.T
    target = training_target(s, x0, t, noise, objective)
    mse = mean_flat(F.mse_loss(pred.float(), target.float(), reduction="none"))
    if weighting == "min_snr":
        mse = mse * min_snr_weight(s, t, objective, min_snr_gamma).to(mse.dtype)
    if loss == "simple":
        return mse
    frozen = torch.cat([pred.detach(), v], dim=1)  # the vb term trains only the variance half
    vb = vb_terms_bpd(lambda *_: frozen, s, x0, x_t, t, variance, objective)
    return mse + vb.to(mse.dtype) * (s.T / HYBRID_LAMBDA_T)
