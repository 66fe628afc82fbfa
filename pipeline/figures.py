"""The `figures` stage: pictures of the diffusion process, drawn from the library, for docs/derivation*.md.

    noising.png       one test image at increasing t under every schedule (q_sample, one shared noise draw)
    schedules.png     abar_t and log SNR_t against t/T for every schedule (improved DDPM's figure 5)
    loss_weights.png  lambda_t of Ho's eq. 12, the per-t weight of the bound that L_simple drops
    denoising.png     x_t and the predicted x_0 along the configured sampler's steps, for a few samples

The bits/dim per t of the evaluated model (with its cumulative share) is drawn by `evaluate`
(reports.plot_bpd_per_t). The choices below are illustration settings, not results: they are fixed here
so that the figures in the documents do not move when an experiment changes a parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_core.data import to_model_range
from ddpm_core.diffusion import EpsModel, Variance, q_sample
from ddpm_core.sampling import run_sampler
from ddpm_core.schedules import SCHEDULES, NoiseSchedule, ScheduleError

from . import paths
from .params import Params, sample_steps
from .reports import _figure

NOISING_IMAGE = 0                                      # index into the test split
NOISING_FRACTIONS = (0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)   # t / T (0: x_0 itself)
NOISE_SEED = 0
DENOISING_SAMPLES = 3
DENOISING_COLUMNS = 8                                  # sampler steps shown, first and last included


def named_schedules(T: int) -> dict[str, NoiseSchedule]:
    """Every schedule that exists at this T (linear, quadratic and sigmoid need T >= 21)."""
    out = {}
    for name in SCHEDULES:
        try:
            out[name] = NoiseSchedule.named(name, T)
        except ScheduleError:
            pass
    return out


def loss_weights(s: NoiseSchedule, variance: Variance) -> np.ndarray:
    """lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) for t = 2..T (Ho eq. 12), float64 [T - 1].

    With it, the KL term L_{t-1} of the bound is lambda_t * ||eps - eps_theta||^2 per dimension (plus a
    constant for fixed_large); L_simple uses weight 1 instead.
    """
    sigma2 = s.posterior_variance if variance == "fixed_small" else s.fixed_large_variance
    b, a, abar = s.betas[1:], s.alphas[1:], s.alphas_cumprod[1:]
    return b**2 / (2 * sigma2[1:] * a * (1 - abar))


def _mosaic(cells: list[list[torch.Tensor]], pad: int = 2) -> np.ndarray:
    """Rows of [C, H, W] tensors in model range -> one [H', W', C] array in [0, 1] on a white background
    (values clipped to [-1, 1] for display: x_t leaves that range)."""
    c, h, w = cells[0][0].shape
    rows, cols = len(cells), len(cells[0])
    out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c))
    for r, row in enumerate(cells):
        for k, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + k * (w + pad)
            out[y:y + h, x:x + w] = ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    return out


def _image_table(cells: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str], path: Path,
                 title: str) -> None:
    """One labelled mosaic: a row label on the left of each row, a column label above each column."""
    plt = _figure()
    img, (h, w), pad = _mosaic(cells), cells[0][0].shape[1:], 2
    width = 1.0 * len(col_labels) + 1.4
    fig, ax = plt.subplots(figsize=(width, width * img.shape[0] / img.shape[1] + 0.5), dpi=120)
    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([pad + k * (w + pad) + w / 2 for k in range(len(col_labels))], col_labels, fontsize=8)
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(row_labels))], row_labels, fontsize=9)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=10, pad=16)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_noising(x0: torch.Tensor, schedules: dict[str, NoiseSchedule], path: Path) -> None:
    """x0: [C, H, W] in [-1, 1]. Row = schedule, column = t; every cell uses the same noise draw."""
    T = next(iter(schedules.values())).T
    ts = sorted({max(1, round(f * T)) if f > 0 else 0 for f in NOISING_FRACTIONS})
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    cells = []
    for s in schedules.values():
        row = [x0 if t == 0 else q_sample(s, x0[None], torch.tensor([t - 1]), noise[None])[0] for t in ts]
        cells.append(row)
    cols = ["$x_0$" if t == 0 else f"t = {t}" for t in ts]
    _image_table(cells, list(schedules), cols, path,
                 f"$x_t \\sim q(x_t\\mid x_0)$: one test image, one noise draw for every cell, T = {T}")


def plot_schedules(schedules: dict[str, NoiseSchedule], path: Path, current: str) -> None:
    """abar_t (left) and log SNR_t = log(abar_t / (1 - abar_t)) (right) against t / T."""
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for name, s in schedules.items():
        x = np.arange(1, s.T + 1) / s.T
        style = {"lw": 2.2 if name == current else 1.3, "label": name + (" (this model)" if name == current else "")}
        left.plot(x, s.alphas_cumprod, **style)
        right.plot(x, np.log(s.alphas_cumprod) - np.log1p(-s.alphas_cumprod), **style)
    T = next(iter(schedules.values())).T
    left.set(xlabel="$t/T$", ylabel=r"$\bar\alpha_t$", title=rf"$\bar\alpha_t$ against $t/T$, T = {T}")
    right.set(xlabel="$t/T$", ylabel=r"$\log\,\mathrm{SNR}_t$",
              title=r"$\log\,\mathrm{SNR}_t=\log\,\bar\alpha_t/(1-\bar\alpha_t)$")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_loss_weights(schedules: dict[str, NoiseSchedule], variance: Variance, path: Path, current: str) -> None:
    """lambda_t for t >= 2 on a log scale; the minimum of each curve is marked."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for k, (name, s) in enumerate(schedules.items()):
        lam = loss_weights(s, variance)
        t = np.arange(2, s.T + 1)
        ax.plot(t / s.T, lam, lw=2.2 if name == current else 1.3, color=f"C{k}",
                label=f"{name}: min {lam.min():.2g} at t = {t[lam.argmin()]}")
        ax.scatter([t[lam.argmin()] / s.T], [lam.min()], color=f"C{k}", s=14, zorder=3)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label=r"$L_\mathrm{simple}$: 1 for every t")
    T = next(iter(schedules.values())).T
    ax.set(xlabel="$t/T$", ylabel=r"$\lambda_t$", yscale="log",
           title=rf"$\lambda_t$, the weight of $\|\epsilon-\epsilon_\theta\|^2$ in the bound ({variance}, T = {T})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sampling_trajectory(net: EpsModel, s: NoiseSchedule, n: int, image_shape: tuple[int, ...], cfg: dict[str, Any],
                        objective: str, variance: Variance, device: torch.device | str):
    """Run the configured sampler on n images and keep (t, x_t, x0_hat) of every step, and the result."""
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def keep(t: int, x_t: torch.Tensor, x0_hat: torch.Tensor) -> None:
        seen.append((t + 1, x_t.cpu(), x0_hat.cpu()))  # t is the 0-based index the network sees

    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    out = run_sampler(net, s, (n, *image_shape), g, cfg["sampler"], cfg["steps"], cfg["eta"], cfg.get("order", 2),
                      variance, objective, cfg["clip_x0"], device, on_step=keep)
    return seen, out.clamp(-1, 1).cpu()


def plot_denoising(seen: list, final: torch.Tensor, path: Path, sampler: str) -> None:
    """Two rows per sample (x_t, then x0_hat), DENOISING_COLUMNS steps and the final sample."""
    pick = np.unique(np.linspace(0, len(seen) - 1, min(DENOISING_COLUMNS, len(seen))).round().astype(int))
    cells, labels = [], []
    for j in range(final.shape[0]):
        cells.append([seen[k][1][j] for k in pick] + [final[j]])
        cells.append([seen[k][2][j] for k in pick] + [final[j]])
        labels += [f"#{j + 1}  $x_t$", rf"#{j + 1}  $\hat x_0$"]
    cols = [f"t={seen[k][0]}" for k in pick] + ["sample"]
    _image_table(cells, labels, cols, path, f"{sampler}, {len(seen)} steps: $x_t$ and the predicted "
                 r"$\hat x_0$ at the step that starts from $x_t$")


def draw_all(net: EpsModel, schedule: NoiseSchedule, current: str, image: np.ndarray, cfg: dict[str, Any],
             variance: Variance, objective: str, device: torch.device | str, folder: Path) -> list[Path]:
    """All four figures into `folder` (file names as in pipeline/paths.py); image: uint8 [C, H, W]."""
    out = [folder / f.name for f in paths.FIGURE_FILES]
    schedules = named_schedules(schedule.T)
    x0 = to_model_range(image[None])[0]
    plot_noising(x0, schedules, out[0])
    plot_schedules(schedules, out[1], current)
    plot_loss_weights(schedules, variance, out[2], current)
    seen, final = sampling_trajectory(net, schedule, DENOISING_SAMPLES, tuple(image.shape), cfg, objective,
                                      variance, device)
    label = {"ancestral": "ancestral", "ddim": f"ddim(eta={cfg['eta']})",
             "dpm_solver++": f"dpm_solver++(order={cfg.get('order', 2)}, eta={cfg['eta']})"}[cfg["sampler"]]
    plot_denoising(seen, final, out[3], label)
    return out


def figures(p: Params) -> None:
    """The stage: the trained EMA model and the prepared test images -> reports/figures/*.png."""
    from .stages import load_ema_model, load_prepared, sample_compute, set_threads

    set_threads(p)
    c = sample_compute(p)
    device = c.device
    net, meta, schedule = load_ema_model(device)
    net = c.network(net)
    image = load_prepared().test_images[NOISING_IMAGE]
    with torch.no_grad():
        cfg = {**p.sample.model_dump(), "steps": sample_steps(p.sample, schedule.T)}
        written = draw_all(net, schedule, meta["diffusion"]["schedule"], image, cfg, p.diffusion.variance,
                           p.diffusion.objective, device, paths.FIGURES)
    print(f"figures: {', '.join(str(f) for f in written)}")
