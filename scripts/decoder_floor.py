"""The worked example of docs/derivation.md section 8: the decoder L_0, its floor, and how sigma_1 moves it.

    PYTHONPATH=. python scripts/decoder_floor.py [--schedule linear] [--T 1000] [--data build/data.npz]
                                                 [--checkpoint build/learned_variance/linear-T1000-hybrid-400.pt]

The decoder's width is sigma_1^2 = beta_tilde_2 for both fixed variances (the clipped value at index 0); a
learned_range network sets it itself, between beta_tilde_2 (v = -1) and beta_1 (v = 1) while v stays in
[-1, 1]. A pixel strictly inside (0, 255) owns a bin of half-width h = 1/255, so no mean gives it more than
2 Phi(h / sigma_1) - 1: that floor rises with sigma_1. A pixel at 0 or 255 owns an open tail, which a mean
pushed outwards can fill. A mean that misses its pixel by e costs -log2(Phi((h - e)/sigma) - Phi((-h - e)/sigma)),
which a wider sigma lowers once e is large enough: the trade a learned sigma_1 makes.

With --data, the floors are averaged over the test images that `evaluate` scores by default (evaluate.seed = 0;
bpd_passes 8000 / 8 passes per image = 1000). With --checkpoint (a learned_range model, e.g. the one
scripts/learned_variance_figure.py trains), its L_0 on those images is computed twice with the same mean and the
same noise: with its learned sigma_1, and with sigma_1 = sqrt(beta_tilde_2); the paired difference has a 95%
interval over images (one noise draw per image; one training seed).
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

from ddpm_core.data import load_dataset, to_model_range  # noqa: E402
from ddpm_core.diffusion import learned_range_variance, p_mean_variance, q_sample  # noqa: E402
from ddpm_core.losses import BIN_HALF_WIDTH, discretized_gaussian_log_likelihood, mean_flat  # noqa: E402
from ddpm_core.schedules import NoiseSchedule  # noqa: E402
from ddpm_core.stats import mean_estimate, paired_difference  # noqa: E402

H = BIN_HALF_WIDTH
LN2 = math.log(2.0)
SIGMAS = (0.0039, 0.0074, 0.01)   # about h, the fixed sigma_1 and sqrt(beta_1) of linear T = 1000
ERRORS = (0.0, 1.0, 2.0, 3.0, 4.0)  # mean errors in units of h


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def interior_bits(sigma: float, error: float = 0.0) -> float:
    """Bits of an interior pixel under N(x + error, sigma^2) integrated over its bin [x - h, x + h]."""
    return -math.log2(phi((H - error) / sigma) - phi((-H - error) / sigma))


def interior_floor_bits(sigma: float) -> float:
    """The least an interior pixel can cost: the mean on the pixel, -log2(2 Phi(h / sigma) - 1)."""
    return -math.log2(math.erf(H / sigma / math.sqrt(2.0)))


def edge_bits(sigma: float) -> float:
    """A pixel at 0 or 255 with the mean on it: its open bin holds Phi(h / sigma)."""
    return -math.log2(phi(H / sigma))


def learned_sigma1_range(s: NoiseSchedule) -> tuple[float, float]:
    """sigma_1 of learned_range at v = -1 and v = 1 (the code's interpolation at index 0)."""
    t, ends = torch.tensor([0]), torch.tensor([-1.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    _, log_var = learned_range_variance(s, t.expand(2), ends)
    lo, hi = torch.exp(0.5 * log_var).flatten().tolist()
    return lo, hi


def crossover_error(sigma_small: float, sigma_large: float) -> float:
    """The mean error (in [-1, 1] units) beyond which the wider Gaussian costs an interior pixel less."""
    lo, hi = 0.0, 10 * H
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if interior_bits(sigma_large, mid) > interior_bits(sigma_small, mid) else (lo, mid)
    return 0.5 * (lo + hi)


def print_floors(s: NoiseSchedule, name: str, sigmas: tuple[float, ...]) -> None:
    sigma = math.exp(0.5 * s.posterior_log_variance_clipped[0])
    print(f"{name} T={s.T}: fixed sigma_1^2 = beta_tilde_2 = {sigma**2:.4g}, sigma_1 = {sigma:.4g} "
          f"= {sigma / H:.2f} h, h = 1/255 = {H:.4g}, h/sigma_1 = {H / sigma:.3f}")
    inside = math.erf(H / sigma / math.sqrt(2))
    print(f"interior pixel: P <= 2 Phi({H / sigma:.3f}) - 1 = {inside:.4f}, "
          f"i.e. >= {interior_floor_bits(sigma):.3f} bits")
    print(f"pixel at 0 or 255 with the mean on it: P = {phi(H / sigma):.4f} ({edge_bits(sigma):.3f} bits); "
          "with the mean pushed outwards: -> 0 bits")
    print("interior floor against sigma: " + ", ".join(f"{x:g}: {interior_floor_bits(x):.2f} bits" for x in sigmas))
    lo, hi = learned_sigma1_range(s)
    print(f"learned_range, t = 1, v in [-1, 1]: sigma_1 from sqrt(beta_tilde_2) = {lo:.5f} to sqrt(beta_1) = {hi:.5f};"
          f" interior floor from {interior_floor_bits(lo):.3f} to {interior_floor_bits(hi):.3f} bits")
    print(f"interior pixel with its mean off by e: bits at sigma_1 = {lo:.5f} / {hi:.5f}: " + ", ".join(
        f"e = {k:g} h: {interior_bits(lo, k * H):.3f} / {interior_bits(hi, k * H):.3f}" for k in ERRORS))
    e = crossover_error(lo, hi)
    print(f"the wider sigma_1 costs less once e > {e:.5f} = {e / H:.2f} h ({e / (2 * H):.2f} gray levels)")


def evaluated_images(test: np.ndarray, seed: int, n: int) -> np.ndarray:
    """The first n test images of `evaluate`'s permutation."""
    return test[np.random.default_rng(seed).permutation(len(test))[:n]]


def print_image_floors(s: NoiseSchedule, images: np.ndarray, seed: int) -> None:
    x0 = to_model_range(images).double()
    outward = torch.where(x0.abs() == 1, 2 * x0, x0)
    for label, sigma in zip(("fixed", "v = 1"), learned_sigma1_range(s)):
        scale = torch.full_like(x0, math.log(sigma))
        for name, mean in (("mean = x_0", x0), ("best mean per pixel", outward)):
            bits = -discretized_gaussian_log_likelihood(x0, mean, scale).mean() / LN2
            print(f"{len(images)} test images (seed {seed}), sigma_1 = {sigma:.5f} ({label}), {name}: "
                  f"L_0 = {float(bits):.3f} bits/dim")
    print(f"pixels strictly inside (0, 255): {float(((images > 0) & (images < 255)).mean()):.3f}")


@torch.no_grad()
def print_learned_decoder(path: Path, images: np.ndarray, seed: int, batch: int = 250) -> None:
    """A learned_range model's L_0 with its own sigma_1 against the same mean with sqrt(beta_tilde_2)."""
    from pipeline.stages import load_ema_model

    net, meta, s = load_ema_model(torch.device("cpu"), path)
    if meta["diffusion"]["variance"] != "learned_range":
        raise SystemExit(f"error: decoder_floor: {path} is not a learned_range model")
    g = torch.Generator().manual_seed(seed)
    learned, fixed, sigma, error, inside = [], [], [], [], []
    fixed_scale = 0.5 * s.posterior_log_variance_clipped[0]
    for start in range(0, len(images), batch):
        x0 = to_model_range(images[start:start + batch])
        t = torch.zeros(len(x0), dtype=torch.long)
        out = p_mean_variance(net, s, q_sample(s, x0, t, torch.randn(x0.shape, generator=g)), t,
                              "learned_range", meta["diffusion"]["objective"])
        log_scale = 0.5 * out["log_variance"]
        learned.append(-mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], log_scale)) / LN2)
        fixed_log_scale = torch.full_like(x0, fixed_scale)
        fixed.append(-mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], fixed_log_scale)) / LN2)
        sigma.append(torch.exp(log_scale).flatten())
        keep = x0.abs() < 0.999
        error.append((out["mean"] - x0).abs()[keep].double())
    learned, fixed = torch.cat(learned).numpy(), torch.cat(fixed).numpy()
    sigma, error = torch.cat(sigma).double(), torch.cat(error)
    lo, hi = learned_sigma1_range(s)
    q = torch.quantile(sigma, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    print(f"{path.name}: learned sigma_1 over pixels: median {q[1]:.5f} (5-95% {q[0]:.5f} to {q[2]:.5f}); "
          f"inside [{lo:.5f}, {hi:.5f}]: {float(((sigma >= lo) & (sigma <= hi)).double().mean()):.3f}")
    e = crossover_error(lo, hi)
    print(f"interior pixels: |mean - x_0| median {float(error.median()) / H:.2f} h; share with |mean - x_0| > "
          f"{e / H:.2f} h (where sqrt(beta_1) beats sqrt(beta_tilde_2)): {float((error > e).double().mean()):.3f}")
    for name, values in (("learned sigma_1", learned), ("sigma_1 = sqrt(beta_tilde_2)", fixed)):
        est = mean_estimate(values)
        print(f"L_0 with {name}: {est.mean:.3f} bits/dim (95% CI {est.ci_low:.3f} to {est.ci_high:.3f}), n = {est.n}")
    d = paired_difference(learned, fixed)
    print(f"learned - fixed, same mean and noise: {d.mean:+.3f} bits/dim (95% CI {d.ci_low:+.3f} to {d.ci_high:+.3f}),"
          f" n = {d.n} images")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="linear")
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    ap.add_argument("--data", default=None,
                    help="build/data.npz of a prepared run (with --checkpoint and no --data: Fashion-MNIST)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a learned_range model's checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print_floors(NoiseSchedule.named(a.schedule, a.T), a.schedule, tuple(a.sigmas))
    test = None
    if a.data:
        with np.load(a.data) as z:
            test = z["test_images"]
    elif a.checkpoint:
        test = load_dataset("fashion_mnist").test_images
    if test is not None:
        images = evaluated_images(test, a.seed, a.n)
        print_image_floors(NoiseSchedule.named(a.schedule, a.T), images, a.seed)
        if a.checkpoint:
            print_learned_decoder(a.checkpoint, images, a.seed)


if __name__ == "__main__":
    main()
