"""The numbers that docs/derivation.md sections 10-13 quote, computed by the library.

    PYTHONPATH=. python scripts/derivation_numbers.py [--T 1000] [--batch 64] [--gamma 5] [--runs 40]

Per schedule: how far apart beta_t and beta_tilde_t are (the learned range, section 10), SNR_1 and the t where
SNR_t falls to gamma and to 1 (Min-SNR, section 13). Then how many training steps the importance sampler of t
(section 12) draws uniformly before every t has HISTORY losses: `runs` simulated trainings with the library's
LossSecondMomentSampler and train.batch_size draws per step (the losses themselves do not matter for this).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
import sys

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm_core.resample import HISTORY, LossSecondMomentSampler  # noqa: E402
from ddpm_core.schedules import SCHEDULES, NoiseSchedule  # noqa: E402


def schedule_numbers(name: str, T: int, gamma: float) -> str:
    s = NoiseSchedule.named(name, T)
    ratio = s.betas[1:] / s.posterior_variance[1:]  # beta_t / beta_tilde_t for t >= 2
    snr = s.alphas_cumprod / (1 - s.alphas_cumprod)
    first = lambda mask: int(np.flatnonzero(mask)[0]) + 1  # noqa: E731  1-based t
    # frac beta + (1 - frac) beta_tilde < 0 once v < -1 - 2 beta_tilde / (beta - beta_tilde), frac = (v + 1) / 2
    v_negative = -1 - 2 / (ratio[0] - 1)
    inv_var = 1 / s.betas[0], 1 / s.posterior_variance[1]  # d(log sigma^2) / d(sigma^2) at t = 1, both ends
    return (f"{name} T={T}: beta_1 / beta_tilde_2 = {s.betas[0] / s.posterior_variance[1]:.3f}; beta_t / beta_tilde_t "
            f"= {ratio[0]:.3f} at t = 2, below 1.01 from t = {first(ratio < 1.01) + 1}; variance-space mix negative "
            f"at t = 2 for v < {v_negative:.3f}; 1 / sigma_1^2 from {inv_var[0]:.4g} to {inv_var[1]:.4g}; "
            f"SNR_1 = {snr[0]:.4g}; SNR_t <= {gamma:g} from t = {first(snr <= gamma)}, <= 1 from t = {first(snr <= 1)}")


def warmup_steps(T: int, batch: int, seed: int) -> int:
    """Steps until every t has HISTORY losses, drawing as Trainer.batch does (uniform until then)."""
    sampler, g, steps = LossSecondMomentSampler(T), torch.Generator().manual_seed(seed), 0
    while not sampler.warmed_up():
        t, _ = sampler.sample(batch, g)
        sampler.counts += torch.bincount(t, minlength=T)  # what update() counts, without storing losses
        sampler.counts.clamp_(max=HISTORY)
        steps += 1
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gamma", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=40)
    a = ap.parse_args()
    for name in SCHEDULES:
        print(schedule_numbers(name, a.T, a.gamma))
    steps = np.array([warmup_steps(a.T, a.batch, seed) for seed in range(a.runs)])
    lo, hi = np.percentile(steps, [2.5, 97.5])
    print(f"importance sampling of t, T={a.T}, batch {a.batch}: uniform for the first {steps.mean():.0f} steps "
          f"on average (at least {math.ceil(HISTORY * a.T / a.batch)}; {a.runs} simulated runs: min {steps.min()}, "
          f"max {steps.max()}, 2.5-97.5% {lo:.0f} to {hi:.0f})")


if __name__ == "__main__":
    main()
