"""The figure of docs/derivation.md section 10: the variance a `learned_range` model learns, against t.

    PYTHONPATH=. python scripts/learned_variance_figure.py [--steps 400] [--threads 1] [--n 64]

Trains params.yaml's model with its learning rate, batch, EMA, seed and schedule, but with
diffusion.variance = learned_range, train.loss = hybrid and train.steps = --steps, on Fashion-MNIST. The
checkpoint stays in build/learned_variance/ (a rerun resumes or reuses it; the same file serves
`scripts/decoder_floor.py --checkpoint`). The EMA network then reads n test images (the first of those
`evaluate` scores, evaluate.seed) at a grid of t, one noise draw each, and the script draws
reports/figures/learned_variance.png:

    left   log sigma_t^2 against t (median over pixels and images, 5-95% band) between log beta_tilde_t
           (v = -1, the clipped value at t = 1) and log beta_t (v = 1)
    right  frac_t = (v + 1) / 2 against t: where between the two ends the learned variance sits

and prints the numbers docs/derivation.md quotes. Illustration at a small budget, one training seed.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
import sys

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm_core.data import load_dataset, to_model_range  # noqa: E402
from ddpm_core.diffusion import learned_range_variance, model_t, output_channels, q_sample, split_output  # noqa: E402
from ddpm_core.schedules import NoiseSchedule  # noqa: E402
from ddpm_core.train import train  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402
from pipeline.params import Params, validate  # noqa: E402
from pipeline.reports import _figure  # noqa: E402
from pipeline.stages import load_ema_model, train_config  # noqa: E402

WORK = ROOT / "build" / "learned_variance"
OUT = ROOT / "reports" / "figures" / "learned_variance.png"
GRID = 40          # geometric grid of t in 1..T
QUOTED_T = (1, 2, 10, 100, 1000)


def hybrid_params(steps: int) -> Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["diffusion"].update(variance="learned_range")
    raw["train"].update(loss="hybrid", t_sampler="uniform", loss_weighting="none", steps=steps, device="cpu")
    return validate(copy.deepcopy(raw))


def checkpoint_path(p: Params) -> Path:
    return WORK / f"{p.diffusion.schedule}-T{p.diffusion.T}-hybrid-{p.train.steps}.pt"


def train_hybrid(p: Params, images: np.ndarray) -> Path:
    """Train (or resume, or reuse) the learned_range + hybrid model; the checkpoint loads with load_ema_model."""
    path = checkpoint_path(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    c, size = images.shape[1], images.shape[2]
    meta = {"model": p.model.model_dump(), "diffusion": p.diffusion.model_dump(), "dataset": p.data.dataset,
            "image_shape": list(images.shape[1:])}
    torch.manual_seed(p.train.seed)
    net = build_unet(meta["model"], c, size, output_channels(c, p.diffusion.variance))
    schedule = NoiseSchedule.named(p.diffusion.schedule, p.diffusion.T)
    train(net, schedule, torch.from_numpy(images), train_config(p), path, meta=meta)
    return path


def test_batch(p: Params, test_images: np.ndarray, n: int) -> torch.Tensor:
    """The first n of the test images `evaluate` scores (its permutation with evaluate.seed)."""
    pick = np.random.default_rng(p.evaluate.seed).permutation(len(test_images))[:n]
    return to_model_range(test_images[pick])


@torch.no_grad()
def learned_v(net, s: NoiseSchedule, x0: torch.Tensor, t_values: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Per 1-based t: quantiles (5, 50, 95%) of frac = (v + 1) / 2 and of log sigma_t^2 over pixels and images,
    and the share of v outside [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    rows = {"frac": [], "log_var": [], "outside": []}
    for t1 in t_values:
        t = torch.full((len(x0),), int(t1) - 1, dtype=torch.long)
        x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=g))
        _, v = split_output(net(x_t, model_t(s, t)), x0.shape[1], "learned_range")
        _, log_var = learned_range_variance(s, t, v.double())
        q = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
        rows["frac"].append(torch.quantile(((v.double() + 1) / 2).flatten(), q).numpy())
        rows["log_var"].append(torch.quantile(log_var.flatten(), q).numpy())
        rows["outside"].append(float((v.abs() > 1).double().mean()))
    return {k: np.asarray(val) for k, val in rows.items()}


def plot(s: NoiseSchedule, t_values: np.ndarray, stats: dict[str, np.ndarray], steps: int, path: Path) -> None:
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    t_all = np.arange(1, s.T + 1)
    left.plot(t_all, np.log(s.betas), color="C3", lw=1, label=r"$\log\beta_t$ ($v=1$)")
    left.plot(t_all, s.posterior_log_variance_clipped, color="C0", lw=1,
              label=r"$\log\tilde\beta_t$ ($v=-1$; $t=1$: $\log\tilde\beta_2$)")
    lv = stats["log_var"]
    left.fill_between(t_values, lv[:, 0], lv[:, 2], color="k", alpha=0.15, lw=0, label="learned, 5-95%")
    left.plot(t_values, lv[:, 1], "k.-", lw=0.8, ms=3, label="learned, median")
    left.set(xscale="log", xlabel="t", ylabel=r"$\log\sigma_t^2$", title="learned log-variance")
    left.legend(fontsize=7, loc="lower right")
    fr = stats["frac"]
    right.axhspan(0, 1, color="C2", alpha=0.06, lw=0)
    right.axhline(0, color="C0", lw=1, label=r"$\tilde\beta_t$")
    right.axhline(1, color="C3", lw=1, label=r"$\beta_t$")
    right.fill_between(t_values, fr[:, 0], fr[:, 2], color="k", alpha=0.15, lw=0, label="5-95% of pixels")
    right.plot(t_values, fr[:, 1], "k.-", lw=0.8, ms=3, label="median")
    right.set(xscale="log", xlabel="t", ylabel=r"$(v+1)/2$", title="where between the two ends")
    right.legend(fontsize=7, loc="best")
    fig.suptitle(f"learned_range + hybrid, Fashion-MNIST, {steps} steps (EMA), linear T = {s.T}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=64, help="test images read at every t")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = hybrid_params(a.steps)
    data = load_dataset(p.data.dataset, p.data.root)
    path = train_hybrid(p, data.train_images)
    net, _, s = load_ema_model(torch.device("cpu"), path)
    t_values = np.unique(np.round(np.geomspace(1, s.T, GRID)).astype(int))
    stats = learned_v(net, s, test_batch(p, data.test_images, a.n), t_values)
    plot(s, t_values, stats, a.steps, a.out)
    print(f"checkpoint: {path.relative_to(ROOT)}; figure: {a.out}")
    for t1 in QUOTED_T:
        if t1 in t_values:
            i = int(np.flatnonzero(t_values == t1)[0])
            f, lv = stats["frac"][i], stats["log_var"][i]
            print(f"t = {t1}: frac median {f[1]:.3f} (5-95% {f[0]:.3f} to {f[2]:.3f}); sigma_t median "
                  f"{np.exp(0.5 * lv[1]):.5g}; between log beta_tilde_t = "
                  f"{s.posterior_log_variance_clipped[t1 - 1]:.4f} "
                  f"and log beta_t = {np.log(s.betas[t1 - 1]):.4f}; v outside [-1, 1]: {stats['outside'][i]:.4f}")
    print(f"v outside [-1, 1] over all t of the grid: max share {stats['outside'].max():.4f}")


if __name__ == "__main__":
    main()
