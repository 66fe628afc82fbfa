"""Uncertainty of the estimates: means with standard errors and 95% intervals, paired differences, bootstrap.

Every interval here is a 95% interval of the quantity named, for the source of noise named: over test images
and noise draws (the ELBO), over samples and reference images (FID-proxy, by bootstrap), or over disjoint
subsets (KID-proxy). None of them covers training noise (seeds): that is the spread across seeds of a sweep.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """mean +/- stderr with a 95% interval [ci_low, ci_high] from n independent units."""

    mean: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        """{'bpd': mean, 'bpd_stderr': ..., 'bpd_ci_low': ..., 'bpd_ci_high': ...} for prefix 'bpd'."""
        d = asdict(self)
        return {prefix: d["mean"], f"{prefix}_stderr": d["stderr"], f"{prefix}_ci_low": d["ci_low"],
                f"{prefix}_ci_high": d["ci_high"]}

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


def t_quantile(dof: float) -> float:
    """Two-sided 95% quantile of Student's t (the normal's 1.96 when dof is infinite)."""
    from scipy import stats as sps  # here, not at the top: scipy.stats takes 1-2 s to import, and every stage
    # process imports this module (params -> elbo_mc) while only evaluate and the reports compute an interval
    return float(sps.t.ppf(0.5 + LEVEL / 2, dof)) if np.isfinite(dof) else float(sps.norm.ppf(0.5 + LEVEL / 2))


def from_stderr(mean: float, stderr: float, n: int, dof: float = np.inf) -> Estimate:
    q = t_quantile(dof)
    return Estimate(float(mean), float(stderr), float(mean - q * stderr), float(mean + q * stderr), int(n))


def mean_estimate(values: np.ndarray) -> Estimate:
    """Mean of i.i.d. values with a Student-t interval (dof n - 1)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2:
        raise ValueError(f"need at least 2 values for an interval; got shape {v.shape}")
    return from_stderr(v.mean(), v.std(ddof=1) / np.sqrt(len(v)), len(v), len(v) - 1)


def grouped_mean_estimate(groups: list[np.ndarray]) -> Estimate:
    """Mean over all values of independent groups whose values are i.i.d. within a group but may differ in
    variance between groups (all with the same expectation): Var = sum_g n_g s_g^2 / n^2.
    dof by Welch-Satterthwaite."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g) > 0]
    if any(len(g) < 2 for g in groups):
        raise ValueError("every group needs at least 2 values for an interval")
    n = sum(len(g) for g in groups)
    parts = np.array([len(g) * g.var(ddof=1) / n**2 for g in groups])
    dof = parts.sum() ** 2 / sum(p**2 / (len(g) - 1) for p, g in zip(parts, groups)) if parts.sum() > 0 else np.inf
    return from_stderr(np.concatenate(groups).mean(), np.sqrt(parts.sum()), n, dof)


def paired_difference(a: np.ndarray, b: np.ndarray) -> Estimate:
    """a - b over paired units (the same test images and noise draws on both sides)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes; got {a.shape} and {b.shape}")
    return mean_estimate(a - b)


def bootstrap(statistic: Callable[[np.random.Generator], float], point: float, reps: int, seed: int,
              n: int) -> Estimate:
    """Normal interval point +/- 1.96 sd over `reps` bootstrap replicates; statistic(rng) computes one
    replicate from its own resampling. The interval is centred on the point estimate: it gives the sampling
    spread of the statistic at this sample size, not a correction of its bias (FID's finite-n bias is common
    to runs of equal n and cancels in their difference)."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng) for _ in range(reps)])
    return from_stderr(point, values.std(ddof=1), n)
