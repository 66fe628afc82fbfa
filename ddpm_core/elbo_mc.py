"""An unbiased Monte-Carlo estimate of the negative ELBO, with its standard error, at a fixed cost.

The bound of one image x is  L(x) = L_T(x) + sum_{i=0}^{T-1} f_i(x),  f_i = E_eps[vb term at index i]
(index 0 = decoder L_0 at t = 1, index i = KL at t = i + 1; see elbo.py). Its value over the test set is
E_x L(x). The all-T estimator (`nll_bpd`) spends T network passes on each image; almost all of the bound and
its variance sit in the first indices, so here every image gets

    exact indices 0 .. k-1 (decoder and the smallest t) and T-1 (t = T), one noise draw each,
    m indices drawn from a proposal p over k .. T-2 by systematic sampling (one uniform u, points (j + u)/m
    on p's CDF: each draw marginally from p restricted to its stratum), each term weighted by 1 / (m p_i),

so  L_hat(x) = L_T(x) + sum_{exact i} f_i + (1/m) sum_j f_{i_j} / p_{i_j}  is unbiased for L(x) for any p > 0.
t = T is exact because a schedule that ends on a clipped beta (cosine: beta_T = 0.999) can put most of an
undertrained model's bound in that one term (measured: 80 of 88 bits/dim, digits, T = 50, 60 steps), which a
proposal shaped from a pilot would rarely draw. Each image's draw of that term is kept (`last_term`), so
the bound without it, per_image - last_term, is unbiased per image and pairs across models as the bound does.
p is log-uniform (p_i ~ 1/(i+1)) for a pilot fraction of the images, then proportional to the root mean
square of the pilot's terms in geometric bins of t (the variance-minimising shape), mixed with 10% of the
log-uniform one so that no weight can explode. The proposal depends only on pilot images, so the per-image
estimates of each phase are i.i.d.; the interval combines the two phases (stats.grouped_mean_estimate) and
covers the variation over test images and over noise and t draws, not over training seeds.

Common random numbers: image j's noise and its u come from generators seeded by (seed, image id), so two
models evaluated with the same seed on the same images see the same draws, and their per-image difference is
a paired sample. Units: bits/dim throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import EpsModel, Objective, Variance, q_sample
from .elbo import check_x0, prior_bpd, vb_terms_bpd
from .stats import Estimate, grouped_mean_estimate, mean_estimate

DEFENSIVE = 0.1  # share of the log-uniform proposal kept in the pilot-shaped one
SEED_STRIDE = 1_000_003
MIN_PILOT_PER_BIN = 8
ESTIMATORS = ("importance", "all_t")  # fewer bins when the pilot has fewer draws than this per bin


@dataclass(frozen=True)
class BoundDesign:
    """exact_t smallest indices and the last one per image evaluated exactly, `draws` more from the proposal
    (draws = 0: all-T, exact_t = T). pilot_fraction of the images shape the proposal; `bins` geometric bins."""

    exact_t: int
    draws: int
    pilot_fraction: float = 0.25
    bins: int = 24

    @classmethod
    def named(cls, estimator: str, T: int, exact_t: int, draws: int) -> "BoundDesign":
        """`importance` with exact_t + 1 + draws passes per image, or `all_t`. Where that is >= T the
        importance design would cost as much as all T terms, so those are taken instead."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)}")
        if estimator == "all_t" or exact_t + 1 + draws >= T:
            return cls(exact_t=T, draws=0)
        return cls(exact_t=exact_t, draws=draws)

    def passes_per_image(self) -> int:
        return self.exact_t + self.draws + (1 if self.draws else 0)  # + t = T

    def check(self, T: int) -> None:
        if not 1 <= self.exact_t <= T:
            raise ValueError(f"exact_t = {self.exact_t} must be in [1, T = {T}]")
        if self.draws < 0 or (self.draws > 0 and self.exact_t > T - 2) or (self.draws == 0 and self.exact_t < T):
            raise ValueError(f"draws = {self.draws} with exact_t = {self.exact_t}: draw t only where T = {T} "
                             f"leaves indices beyond exact_t, and draw some where it does")


@dataclass
class BoundEstimate:
    """The estimate: per image, in total with its interval, and per t (exact or binned)."""

    per_image: np.ndarray     # [n] unbiased estimates of each image's bound, bits/dim (prior included)
    image_ids: np.ndarray     # [n] the images' ids (test-set indices), for pairing
    phase: np.ndarray         # [n] 0 = pilot (log-uniform proposal), 1 = pilot-shaped proposal
    total: Estimate           # mean over images with stderr and 95% interval
    prior_bpd: float
    decoder_bpd: float        # mean over images of the exact decoder term
    terms_bpd: np.ndarray     # [T] mean term per index: exact below exact_t and at T, per geometric bin between
    network_passes: int
    design: BoundDesign
    last_term: np.ndarray     # [n] each image's exact t = T term L_{T-1}, bits/dim: the draw inside per_image

    def groups(self, values: np.ndarray) -> list[np.ndarray]:
        """Per-image values split by phase: the independent groups of grouped_mean_estimate."""
        return [values[self.phase == ph] for ph in np.unique(self.phase)]

    def without_last_term(self) -> Estimate:
        """The bound less its t = T term, over the same images and draws (per_image - last_term, unbiased
        per image), with its interval as the total's."""
        rest = self.per_image - self.last_term
        if len(rest) < 2:
            return Estimate(float(rest[0]), np.nan, np.nan, np.nan, 1)
        return grouped_mean_estimate(self.groups(rest))

    def last_term_estimate(self) -> Estimate:
        """The t = T term's mean over the images, with its interval (one exact draw per image, i.i.d.)."""
        last = self.last_term
        return mean_estimate(last) if len(last) >= 2 else Estimate(float(last[0]), np.nan, np.nan, np.nan, 1)


def geometric_edges(lo: int, hi: int, bins: int) -> np.ndarray:
    """Integer bin edges from lo to hi (exclusive), geometric in t = index + 1, each bin non-empty."""
    edges = np.unique(np.round(np.geomspace(lo + 1, hi + 1, bins + 1)).astype(int) - 1)
    edges[0], edges[-1] = lo, hi
    return np.unique(edges)


def log_uniform(lo: int, hi: int, T: int) -> np.ndarray:
    """p_i ~ 1 / (i + 1) over indices lo .. hi-1, as a length-T vector (0 elsewhere)."""
    p = np.zeros(T)
    p[lo:hi] = 1.0 / np.arange(lo + 1, hi + 1)
    return p / p.sum()


def shaped_proposal(pilot_sq: np.ndarray, edges: np.ndarray, T: int) -> np.ndarray:
    """p_i ~ sqrt(mean of f^2 in i's bin) from the pilot's per-bin sums of f^2 (pilot_sq[b], an unbiased
    estimate of sum_{i in bin b} E f_i^2), mixed with DEFENSIVE of the log-uniform proposal over the bins."""
    base = log_uniform(edges[0], edges[-1], T)
    g = np.zeros(T)
    for b in range(len(edges) - 1):
        g[edges[b]:edges[b + 1]] = np.sqrt(max(pilot_sq[b], 0.0) / (edges[b + 1] - edges[b]))
    if not np.isfinite(g).all() or g.sum() <= 0:
        return base
    return (1 - DEFENSIVE) * g / g.sum() + DEFENSIVE * base


def systematic_draws(p: np.ndarray, m: int, u: float) -> np.ndarray:
    """m indices at the points (j + u) / m of p's CDF, j = 0 .. m-1."""
    cdf = np.cumsum(p)
    idx = np.searchsorted(cdf / cdf[-1], (np.arange(m) + u) / m, side="right")
    return np.minimum(idx, len(p) - 1)


def image_generators(image_ids: np.ndarray, seed: int, device: torch.device):
    """One torch generator (noise) and one numpy generator (u) per image, seeded by (seed, id)."""
    keys = [seed * SEED_STRIDE + int(i) for i in image_ids]
    return ([torch.Generator(device=device).manual_seed(k) for k in keys],
            [np.random.default_rng([seed, int(i)]) for i in image_ids])


@torch.no_grad()
def terms_at(model: EpsModel, s, x0: torch.Tensor, t_idx: torch.Tensor, gens: list[torch.Generator],
             variance: Variance, objective: Objective, chunk_size: int, bar: tqdm | None) -> torch.Tensor:
    """vb terms f[i, j] at index t_idx[i, j] of image i, bits/dim [n, k]; slot j's noise is the j-th draw of
    image i's generator (drawn one slot at a time, so chunking does not change it)."""
    n, k = t_idx.shape
    image = torch.arange(n, device=x0.device).repeat_interleave(k)
    flat_t = t_idx.reshape(-1).to(x0.device)
    out = torch.empty(n * k, dtype=torch.float64, device=x0.device)
    for start in range(0, n * k, chunk_size):
        sl = slice(start, min(start + chunk_size, n * k))
        noise = torch.stack([torch.randn(x0.shape[1:], generator=gens[int(i)], device=x0.device, dtype=x0.dtype)
                             for i in image[sl]])
        x, t = x0[image[sl]], flat_t[sl]
        out[sl] = vb_terms_bpd(model, s, x, q_sample(s, x, t, noise), t, variance, objective).double()
        if bar is not None:
            bar.update(sl.stop - sl.start)
    return out.reshape(n, k)


def _pilot_count(n: int, design: BoundDesign) -> int:
    """Pilot images: a fraction of n, at least 2; all of them when fewer than 2 would be left."""
    n_pilot = min(n, max(2, round(n * design.pilot_fraction)))
    return n if n - n_pilot < 2 else n_pilot


def _drawn_phase(model, s, x0, gens, rngs, p, m, edges, variance, objective, chunk_size, bar):
    """Each image's m systematic draws from p, weighted: their sum per bin [n, bins] (and the same of f^2,
    for shaping the next proposal)."""
    idx = np.stack([systematic_draws(p, m, rng.random()) for rng in rngs])                   # [n, m]
    f = terms_at(model, s, x0, torch.from_numpy(idx), gens, variance, objective, chunk_size, bar).cpu().numpy()
    w = 1.0 / (m * p[idx])
    bins = np.searchsorted(edges, idx, side="right") - 1
    per_bin = np.zeros((len(idx), len(edges) - 1))
    per_bin_sq = np.zeros_like(per_bin)
    rows = np.repeat(np.arange(len(idx)), m)
    np.add.at(per_bin, (rows, bins.ravel()), (f * w).ravel())
    np.add.at(per_bin_sq, (rows, bins.ravel()), (f**2 * w).ravel())
    return per_bin, per_bin_sq


def estimate_bound(model: EpsModel, s, x0: torch.Tensor, image_ids: np.ndarray, design: BoundDesign,
                   variance: Variance = "fixed_small", objective: Objective = "eps", chunk_size: int = 256,
                   seed: int = 0, progress: bool = False) -> BoundEstimate:
    """The negative ELBO of the images x0 ([n, C, H, W] on the 8-bit grid in [-1, 1], ids for pairing)
    under `design`: all-T when design.draws == 0, else the pilot + shaped-proposal estimator above."""
    check_x0(x0)
    T, n, k = s.T, len(x0), design.exact_t
    design.check(T)
    gens, rngs = image_generators(np.asarray(image_ids), seed, x0.device)
    bar = tqdm(total=n * design.passes_per_image(), desc="ELBO", unit="pass", disable=not progress, leave=False)
    exact_idx = torch.tensor(list(range(k)) + ([T - 1] if design.draws else []))
    exact = terms_at(model, s, x0, exact_idx.expand(n, len(exact_idx)), gens, variance, objective, chunk_size, bar)
    exact = exact.cpu().numpy()
    prior = prior_bpd(s, x0).double().cpu().numpy()
    per_image, terms, phase = prior + exact.sum(1), np.zeros(T), np.zeros(n, dtype=int)
    terms[exact_idx.numpy()] = exact.mean(0)
    groups = [per_image]
    if design.draws:
        n_pilot = _pilot_count(n, design)
        phase[n_pilot:] = 1
        pilot, m = slice(0, n_pilot), design.draws
        edges = geometric_edges(k, T - 1, max(1, min(design.bins, n_pilot * m // MIN_PILOT_PER_BIN)))
        per_bin, per_bin_sq = _drawn_phase(model, s, x0[pilot], gens[pilot], rngs[pilot], log_uniform(k, T - 1, T),
                                           m, edges, variance, objective, chunk_size, bar)
        if n_pilot < n:
            rest = slice(n_pilot, n)
            p = shaped_proposal(per_bin_sq.mean(0), edges, T)
            more, _ = _drawn_phase(model, s, x0[rest], gens[rest], rngs[rest], p, m, edges, variance, objective,
                                   chunk_size, bar)
            per_bin = np.concatenate([per_bin, more])
        per_image = per_image + per_bin.sum(1)
        for b, mean_b in enumerate(per_bin.mean(0)):
            terms[edges[b]:edges[b + 1]] = mean_b / (edges[b + 1] - edges[b])
        groups = [per_image[phase == 0], per_image[phase == 1]]
    bar.close()
    total = grouped_mean_estimate(groups) if n >= 2 else Estimate(float(per_image[0]), np.nan, np.nan, np.nan, 1)
    return BoundEstimate(per_image, np.asarray(image_ids), phase, total, float(prior.mean()),
                         float(exact[:, 0].mean()), terms, n * design.passes_per_image(), design,
                         last_term=exact[:, -1].copy())  # exact_idx ends on T - 1 in both designs
