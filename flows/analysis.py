"""A sweep's evidence, with pandas: one row per point, paired differences against a reference point, and the
spread across training seeds.

Paired differences are possible because every point evaluates the ELBO on the same test images with the same
noise and t draws (evaluate.seed), and the FID-proxy against the same reference images in the same features:
    bits/dim:  mean over common images of (bound_point - bound_ref), Student-t 95% interval;
    FID-proxy: FID(point) - FID(ref), 95% interval from the bootstrap sd (samples of both points and the shared
               reference resampled).
Both cover the estimator's noise (images, noise draws, samples) for the two trained models as they are, not
training noise: that is what the seeds table shows (mean and sd across train.seed).
The same holds for a change of a contrast, (a2 - b2) - (a1 - b1), e.g. between two training budgets: per image
for bits/dim; for the FID-proxy a bootstrap that resamples the shared reference once for all four points (the
reference is paired, the four points' samples are not).
`bpd_without_last_term` is bits/dim less each image's exact t = T term (the same draw the bound used).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ddpm_core.fid import fid_bootstrap, fid_from_features
from ddpm_core.stats import Estimate, bootstrap, mean_estimate
from pipeline.params import ParamsError

from .points import PointResult, short_key

DIFF_COLUMNS = ("bpd_diff", "bpd_diff_ci_low", "bpd_diff_ci_high", "fid_proxy_diff", "fid_proxy_diff_ci_low",
                "fid_proxy_diff_ci_high")
SEED_KEY = "train.seed"
BOOTSTRAP_REPS = 200


def reference_index(results: list[PointResult], reference: dict[str, Any] | None) -> int | None:
    """The reference point: the one whose axes match every key of `reference`, else the first that succeeded."""
    ok = [i for i, r in enumerate(results) if r.status == "ok"]
    if not reference:
        return ok[0] if ok else None
    match = [i for i, r in enumerate(results) if all(str(r.axes.get(k)) == str(v) for k, v in reference.items())]
    if len(match) != 1:
        raise ParamsError(f"reference {reference} matches {len(match)} points of the grid; it must match exactly one")
    return match[0] if results[match[0]].status == "ok" else None


BPD_METRICS = ("bpd", "bpd_without_last_term")


def per_image(r: PointResult, metric: str = "bpd") -> dict[int, float]:
    """Test image id -> the point's bits/dim (metric bpd) or bits/dim less its t = T term (empty when the
    experiment predates the last-term column)."""
    if metric == "bpd":
        return r.bpd_per_image
    return {i: r.bpd_per_image[i] - last for i, last in r.last_term_per_image.items() if i in r.bpd_per_image}


def bpd_difference(a: PointResult, ref: PointResult, metric: str = "bpd") -> Estimate | None:
    return bpd_change([a, ref], [1.0, -1.0], metric)


def bpd_change(points: list[PointResult], weights: list[float], metric: str = "bpd") -> Estimate | None:
    """sum_k w_k * metric(points[k]), paired per test image over the images all points share (a - b: weights
    1, -1; a change of a contrast between budgets: (a2 - b2) - (a1 - b1)). None below 2 common images."""
    maps = [per_image(p, metric) for p in points]
    common = sorted(set.intersection(*(set(m) for m in maps)))
    if len(common) < 2:
        return None
    return mean_estimate(sum(w * np.array([m[i] for i in common]) for w, m in zip(weights, maps)))


def fid_difference(a: PointResult, ref: PointResult, seed: int = 0) -> Estimate | None:
    """None when the two points were not scored against the same reference features."""
    fa, fr = a.fid_features, ref.fid_features
    if not fa or not fr or fa["test"].shape != fr["test"].shape or not np.allclose(fa["test"], fr["test"], atol=1e-4):
        return None
    return fid_bootstrap(fa["gen"], fa["test"], BOOTSTRAP_REPS, seed, minus=fr["gen"])


def fid_change(points: list[PointResult], weights: list[float], seed: int = 0) -> Estimate | None:
    """sum_k w_k * FID-proxy(points[k]) with a bootstrap 95% interval: each replicate resamples every point's
    samples and, once for all of them, the shared reference images. None when the points were not scored
    against the same reference features."""
    feats = [p.fid_features for p in points]
    ref = feats[0]["test"] if feats[0] else None
    if ref is None or any(not f or f["test"].shape != ref.shape or not np.allclose(f["test"], ref, atol=1e-4)
                          for f in feats):
        return None

    def stat(gens: list[np.ndarray], test: np.ndarray) -> float:
        return float(sum(w * fid_from_features(g, test) for w, g in zip(weights, gens)))

    def replicate(rng: np.random.Generator) -> float:
        pick = [rng.integers(0, len(f["gen"]), len(f["gen"])) for f in feats]
        return stat([f["gen"][i] for f, i in zip(feats, pick)], ref[rng.integers(0, len(ref), len(ref))])

    return bootstrap(replicate, stat([f["gen"] for f in feats], ref), BOOTSTRAP_REPS, seed, len(feats[0]["gen"]))


def differences(results: list[PointResult], ref: int | None) -> list[dict[str, float | None]]:
    """DIFF_COLUMNS for every point against results[ref] (empty for the reference and failed points)."""
    out = []
    for i, r in enumerate(results):
        row: dict[str, float | None] = dict.fromkeys(DIFF_COLUMNS)
        if ref is not None and i != ref and r.status == "ok":
            for name, est in (("bpd", bpd_difference(r, results[ref])), ("fid_proxy", fid_difference(r, results[ref]))):
                if est is not None:
                    row.update({f"{name}_diff": est.mean, f"{name}_diff_ci_low": est.ci_low,
                                f"{name}_diff_ci_high": est.ci_high})
        out.append(row)
    return out


def table(results: list[PointResult], ref: int | None) -> pd.DataFrame:
    """One row per point (grid order): its axes, status, metrics with intervals, differences, bookkeeping."""
    frame = pd.DataFrame([{**r.row(), **d} for r, d in zip(results, differences(results, ref))])
    frame.insert(len(results[0].axes) if results else 0, "reference", [i == ref for i in range(len(results))])
    return frame


def seed_spread(results: list[PointResult]) -> pd.DataFrame:
    """Mean and sd across train.seed of bpd and fid_proxy for every other combination of the axes, beside
    the mean within-run 95% half-width (the estimator's noise) for comparison. Empty without a seed axis."""
    keys = tuple(results[0].axes) if results else ()
    if SEED_KEY not in keys:
        return pd.DataFrame()
    rows = pd.DataFrame([{**{short_key(k, keys): v for k, v in r.axes.items()}, **r.metrics}
                         for r in results if r.status == "ok"])
    if rows.empty:
        return rows
    by = [short_key(k, keys) for k in keys if k != SEED_KEY]
    rows["bpd_half_width"] = (rows["bpd_ci_high"] - rows["bpd_ci_low"]) / 2
    rows["fid_proxy_half_width"] = (rows["fid_proxy_ci_high"] - rows["fid_proxy_ci_low"]) / 2
    agg = {"seeds": ("bpd", "size"), "bpd_mean": ("bpd", "mean"), "bpd_sd_across_seeds": ("bpd", "std"),
           "bpd_within_run_half_width": ("bpd_half_width", "mean"), "fid_proxy_mean": ("fid_proxy", "mean"),
           "fid_proxy_sd_across_seeds": ("fid_proxy", "std"),
           "fid_proxy_within_run_half_width": ("fid_proxy_half_width", "mean")}
    grouped = rows.groupby(by, sort=False, dropna=False) if by else rows.assign(_all="all").groupby("_all")
    return grouped.agg(**agg).reset_index()


PHRASES = {  # metric: (how a difference reads, the words for below / above, the name in "no difference")
    "bpd": ("{x} bits/dim {word}", ("less", "more"), "bits/dim"),
    "fid_proxy": ("a FID-proxy {x} {word}", ("lower", "higher"), "FID-proxy"),
}


def verdict(label: str, ref_label: str, metric: str, diff: float | None, low: float | None, high: float | None,
            count: str) -> str | None:
    """'cosine, T = 100 has 0.21 bits/dim less than linear, T = 100 (95% CI 0.15 to 0.27, paired over 500 test
    images).' where the interval excludes 0, else 'No difference in bits/dim detected ...'."""
    if diff is None or pd.isna(diff):
        return None
    phrase, (below, above), name = PHRASES[metric]
    if low > 0 or high < 0:
        word, lo, hi = (below, -high, -low) if diff < 0 else (above, low, high)
        return (f"{label} has {phrase.format(x=f'{abs(diff):.3g}', word=word)} than {ref_label} "
                f"(95% CI {lo:.3g} to {hi:.3g}, {count}).")
    return (f"No difference in {name} detected between {label} and {ref_label} at this budget: {diff:+.3g} "
            f"(95% CI {low:.3g} to {high:.3g}, {count}).")


def verdicts(results: list[PointResult], frame: pd.DataFrame, ref: int | None) -> list[str]:
    """The verdict sentences of every point against the reference, bits/dim first. Bits/dim are the model's,
    whatever the sampler: one sentence per trained model (named without the sampling axes), at its first
    point, and none for the reference's own model."""
    if ref is None:
        return []
    out, said = [], {results[ref].model_label}
    for i, r in enumerate(results):
        row = frame.iloc[i]
        labels = {"bpd": (r.model_label, results[ref].model_label), "fid_proxy": (r.label, results[ref].label)}
        counts = {"bpd": f"paired over {len(set(r.bpd_per_image) & set(results[ref].bpd_per_image))} test images",
                  "fid_proxy": f"bootstrap over {r.metrics.get('n_fid', 0):.0f} samples per side"}
        for metric, count in counts.items():
            if metric == "bpd" and r.model_label in said:
                continue
            s = verdict(*labels[metric], metric, row[f"{metric}_diff"], row[f"{metric}_diff_ci_low"],
                        row[f"{metric}_diff_ci_high"], count)
            if s:
                out.append(s)
                if metric == "bpd":
                    said.add(r.model_label)
    return out
