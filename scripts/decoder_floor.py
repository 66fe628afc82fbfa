"""The worked example of docs/derivation.md section 8: how far the decoder L_0 can fall at a given schedule.

    PYTHONPATH=. python scripts/decoder_floor.py [--schedule linear] [--T 1000] [--data build/data.npz]

The decoder's width is sigma_1^2 = beta_tilde_2 (the clipped value at index 0). A pixel strictly inside
(0, 255) owns a bin of half-width 1/255, so no mean gives it more than 2 Phi(h / sigma_1) - 1; a pixel at 0
or 255 owns an open tail, which a mean pushed outwards can fill. With --data, the floors are averaged over the
test images that `evaluate` scores by default (evaluate.seed = 0; bpd_passes 8000 / 8 passes per image = 1000).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from ddpm_core.data import to_model_range
from ddpm_core.losses import discretized_gaussian_log_likelihood
from ddpm_core.schedules import NoiseSchedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="linear")
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--data", default=None, help="build/data.npz of a prepared run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args()
    s = NoiseSchedule.named(a.schedule, a.T)
    log_var, h = s.posterior_log_variance_clipped[0], 1 / 255
    sigma = math.exp(0.5 * log_var)
    inside = math.erf(h / sigma / math.sqrt(2))  # 2 Phi(h / sigma) - 1
    print(f"{a.schedule} T={a.T}: sigma_1^2 = {sigma**2:.4g}, sigma_1 = {sigma:.4g}, h = 1/255 = {h:.4g}, "
          f"h/sigma_1 = {h / sigma:.3f}")
    print(f"interior pixel: P <= 2 Phi({h / sigma:.3f}) - 1 = {inside:.4f}, i.e. >= {-math.log2(inside):.3f} bits")
    edge = 0.5 * (1 + math.erf(h / sigma / math.sqrt(2)))
    print(f"pixel at 0 or 255 with the mean on it: P = {edge:.4f} ({-math.log2(edge):.3f} bits); "
          "with the mean pushed outwards: -> 0 bits")
    if a.data:
        with np.load(a.data) as z:
            test = z["test_images"]
        pick = np.random.default_rng(a.seed).permutation(len(test))[: a.n]
        x0 = to_model_range(test[pick]).double()
        scale = torch.full_like(x0, 0.5 * log_var)
        outward = torch.where(x0.abs() == 1, 2 * x0, x0)
        for name, mean in (("mean = x_0", x0), ("best mean per pixel", outward)):
            bits = -discretized_gaussian_log_likelihood(x0, mean, scale).mean() / math.log(2)
            print(f"{a.n} test images (seed {a.seed}), {name}: L_0 = {float(bits):.3f} bits/dim")
        print(f"pixels strictly inside (0, 255): {float(((test[pick] > 0) & (test[pick] < 255)).mean()):.3f}")


if __name__ == "__main__":
    main()
