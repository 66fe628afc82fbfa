"""Pictures and tables for a person: sample grid, training curve, bits/dim per t, a markdown summary."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def save_grid(images: np.ndarray, path: Path, ncols: int = 8, scale: int = 3, pad: int = 2) -> None:
    """uint8 [N, C, H, W] -> one PNG grid (nearest-neighbour upscaled so 28x28 items are visible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, ncols, scale, pad).save(path)


def grid_image(images: np.ndarray, ncols: int = 8, scale: int = 3, pad: int = 2):
    """uint8 [N, C, H, W] -> a PIL image of the grid (see save_grid)."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + ncols - 1) // ncols
    grid = np.full((c, rows * (h + pad) + pad, ncols * (w + pad) + pad), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    return Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_csv_columns(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in (rows[0].keys() if rows else [])}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(steps: np.ndarray, loss: np.ndarray, path: Path, title: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="per step")
    window = max(1, len(loss) // 50)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.6, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="L_simple (MSE)", title=title, yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bpd_per_t(terms_bpd: np.ndarray, path: Path, title: str) -> None:
    """Bits/dim of each term L_{t-1} against t (log scales; the decoder L_0 sits at t = 1), and on a second
    axis the cumulative share of their sum carried by the terms up to t (L_T is left out: ~1e-5 bits/dim)."""
    plt = _figure()
    t = np.arange(1, len(terms_bpd) + 1)
    share = np.cumsum(terms_bpd) / terms_bpd.sum()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.plot(t[1:], np.clip(terms_bpd[1:], 1e-8, None), lw=1.2, label="KL terms L_{t-1}")
    ax.scatter([1], [terms_bpd[0]], color="C3", zorder=3, label=f"decoder L_0 = {terms_bpd[0]:.3f}")
    ax.set(xlabel="t", ylabel="bits/dim", title=title, xscale="log", yscale="log")
    right = ax.twinx()
    right.plot(t, 100 * share, color="C2", lw=1.6, label="cumulative share of the sum (right)")
    marks = [m for m in (1, 10, 100) if m < len(t)]
    for m in marks:
        right.annotate(f"t <= {m}: {100 * share[m - 1]:.0f}%", (m, 100 * share[m - 1]), xytext=(4, -12),
                       textcoords="offset points", fontsize=7, color="C2")
    right.scatter(marks, [100 * share[m - 1] for m in marks], color="C2", s=12, zorder=3)
    right.set(ylabel="% of the sum of the terms", ylim=(0, 105))
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="center right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def with_interval(metrics: dict[str, Any], key: str) -> str:
    """'3.84 (95% CI 3.75 to 3.93)' where the metric has an interval, else the value."""
    value = f"{metrics[key]:.4g}"
    if f"{key}_ci_low" in metrics:
        return f"{value} (95% CI {metrics[key + '_ci_low']:.4g} to {metrics[key + '_ci_high']:.4g})"
    if f"{key}_stderr" in metrics:
        return f"{value} +/- {metrics[key + '_stderr']:.2g} (standard error)"
    return value


HEADLINE = ("bpd", "prior_bpd", "decoder_bpd", "fid_proxy", "fid_proxy_floor", "kid_proxy", "kid_proxy_floor",
            "fid", "fid_floor", "kid", "kid_floor", "classifier_accuracy")


def summary_markdown(params_flat: dict[str, Any], metrics: dict[str, Any]) -> str:
    keys = ("data.dataset", "diffusion.T", "diffusion.schedule", "diffusion.objective", "model.channels",
            "model.channel_mults", "train.steps", "train.batch_size", "train.lr", "sample.sampler", "sample.steps")
    lines = ["# Run summary", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {params_flat[k]} |" for k in keys if k in params_flat]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {with_interval(metrics, k)} |" for k in HEADLINE if k in metrics]
    detail = [k for k in metrics if k not in HEADLINE and not k.endswith(("_ci_low", "_ci_high", "_stderr"))]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in
              ((k, metrics[k]) for k in detail)]
    draws = metrics.get("bpd_draws", 0)
    how = (f"all T terms of each image" if not draws else
           f"an unbiased Monte-Carlo estimate: t <= {metrics.get('bpd_exact_t')} and t = T exactly and {draws} t drawn "
           "per image from a pilot-shaped proposal, weighted by 1/p")
    lines += ["", f"Negative ELBO in bits/dim (prior L_T, KL terms, discretized decoder L_0) on {metrics.get('n_bpd')} "
              f"test images with {metrics.get('bpd_network_passes')} network passes: {how}. Its 95% interval covers "
              "the variation over test images and noise draws, not over training seeds. FID-proxy on "
              f"{metrics.get('n_fid')} samples against test images in the features of a classifier trained on this "
              "data set (comparable only between runs with the same featurizer and n_fid; fid_proxy_floor is "
              "real-vs-real at the same count); its interval is the bootstrap sd over samples and reference images. "
              "KID-proxy's error is over disjoint subsets."
              + (" fid and kid: the same samples and reference images in pytorch-fid's FID Inception-v3 pool3 "
                 "features (images resized to 299 x 299 bilinearly, grayscale repeated to 3 channels), comparable "
                 "with published FIDs computed at the same n against the same reference." if "fid" in metrics else ""),
              "",
              "![samples](samples.png)", "", "![training loss](train_loss.png)", "", "![bits/dim per t](bpd_per_t.png)", ""]
    return "\n".join(lines)
