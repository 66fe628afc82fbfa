"""FID-proxy: Frechet distance in the penultimate features of a classifier trained on the same data set.

Inception weights cannot be downloaded here, so the feature extractor is a small CNN trained (deterministically,
from a seed) on the data set's training split. Its numbers are comparable between runs that share the same
featurizer file (same data checksum, same seed), not with published FIDs. Reported with it:
    fid_proxy_floor   real-vs-real: a train subset against the test images at the same sample count
    *_ci_low/high     95% intervals from the bootstrap sd (samples and reference images resampled)
    kid_proxy         unbiased kernel (KID-style, cubic polynomial) MMD^2 in the same features, with its
                      standard error over disjoint subsets
    classifier_accuracy, n_fid
The standard FID (pytorch-fid's Inception-v3 pool3 features) comes from `inception.inception_featurize` when the
user has its weights; `report_from_features(..., fid_key="fid", kid_key="kid")` names its keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import ImageData, to_model_range
from .stats import Estimate, bootstrap

Featurize = Callable[[torch.Tensor], np.ndarray]  # uint8 [N, C, H, W] -> float64 features [N, D]


@dataclass(frozen=True)
class FeaturizerConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    feature_dim: int = 128
    seed: int = 0


class Classifier(nn.Module):
    """conv(w)-conv(w)-pool-conv(2w)-conv(2w)-pool-fc(feature_dim)-fc(classes); features = the fc input."""

    def __init__(self, channels: int, num_classes: int, width: int, feature_dim: int):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@torch.no_grad()
def predict(net: nn.Module, images: np.ndarray | torch.Tensor, fn: str, batch_size: int = 512) -> torch.Tensor:
    """Apply net.<fn> to uint8 images in batches, in eval mode, on the net's device."""
    net.eval()
    device = next(net.parameters()).device
    images = torch.as_tensor(images)
    outs = [getattr(net, fn)(to_model_range(images[i:i + batch_size]).to(device)).double().cpu()
            for i in range(0, len(images), batch_size)]
    return torch.cat(outs)


def train_classifier(data: ImageData, cfg: FeaturizerConfig, device: str | torch.device = "cpu",
                     progress: bool = True) -> tuple[Classifier, float]:
    """Train the featurizer on the training split; returns it and its test accuracy."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = Classifier(data.image_shape[0], data.num_classes, cfg.width, cfg.feature_dim).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    images, labels = torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels)
    steps_per_epoch = (len(images) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="featurizer", unit="step", disable=not progress)
    for _ in range(cfg.epochs):
        net.train()
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = to_model_range(images[idx]).to(device)
            loss = F.cross_entropy(net(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    pred = predict(net, data.test_images, "forward").argmax(1).numpy()
    return net, float((pred == data.test_labels).mean())


def load_or_train_featurizer(path: str | Path, data: ImageData, cfg: FeaturizerConfig = FeaturizerConfig(),
                             device: str | torch.device = "cpu", progress: bool = True,
                             train_missing: bool = True) -> tuple[Classifier, dict]:
    """Reuse the featurizer at `path` when it was trained on the same data with the same config, else train
    and save one (or, with train_missing=False, refuse). Returns the classifier and its info (data checksum,
    test accuracy, config)."""
    path, checksum = Path(path), data.checksum()
    if path.exists():
        ckpt = load_checkpoint(path, map_location=device)
        info = ckpt["info"]
        if info["data_checksum"] == checksum and info["config"] == asdict(cfg):
            net = Classifier(data.image_shape[0], data.num_classes, cfg.width, cfg.feature_dim).to(device)
            net.load_state_dict(ckpt["model"])
            return net, info
    if not train_missing:
        raise CheckpointError(f"{path} is missing or was trained on other data or another config than "
                              f"{asdict(cfg)}; rebuild it (`dvc repro featurizer`)")
    net, accuracy = train_classifier(data, cfg, device, progress)
    info = {"data_checksum": checksum, "dataset": data.name, "accuracy": accuracy, "config": asdict(cfg)}
    save_checkpoint({"model": net.state_dict(), "info": info}, path)
    return net, info


# --- distances ------------------------------------------------------------------------------------------
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, D]; got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), with tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2}
    computed from symmetric eigendecompositions (no complex sqrtm, no negative round-off)."""
    root1 = _sqrt_psd(sigma1)
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_cross)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between feature sets with the KID kernel k(a, b) = (a.b / d + 1)^3."""
    d, m, k = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (k * (k - 1))
                 - 2 * kxy.mean())


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 10, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance in these features and its standard error: unbiased MMD^2 on `subsets`
    disjoint random subsets (each point used once), their mean and sd / sqrt(subsets). Disjoint subsets
    are independent, so the standard error is honest (overlapping ones would understate it)."""
    rng = np.random.default_rng(seed)
    size = min(len(f1), len(f2)) // subsets
    if size < 2:
        raise ValueError(f"KID needs at least {2 * subsets} points per side for {subsets} subsets")
    p1, p2 = rng.permutation(len(f1)), rng.permutation(len(f2))
    vals = np.array([mmd2_unbiased(f1[p1[i * size:(i + 1) * size]], f2[p2[i * size:(i + 1) * size]])
                     for i in range(subsets)])
    return float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(subsets))


def frechet_distance_low_rank(f1: np.ndarray, f2: np.ndarray) -> float:
    """The Frechet distance of the two feature sets' Gaussians, computed in sample space: with centred features
    a [n1, D], b [n2, D], S1 = a'a / (n1 - 1) and S2 = b'b / (n2 - 1), the nonzero eigenvalues of S1 S2 are those
    of M M' / ((n1 - 1)(n2 - 1)) with M = a b' [n1, n2] (XY and YX share them), so tr (S1 S2)^{1/2} is M's
    nuclear norm over sqrt((n1 - 1)(n2 - 1)). Exact; O(n1 n2 D) instead of O(D^3): the cheap path when D > n
    (2048-d Inception features of a few hundred images, bootstrapped 200 times)."""
    a, b = f1 - f1.mean(axis=0), f2 - f2.mean(axis=0)
    n1, n2 = len(f1), len(f2)
    tr_cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    mean_term = ((f1.mean(axis=0) - f2.mean(axis=0)) ** 2).sum()
    return float(mean_term + (a**2).sum() / (n1 - 1) + (b**2).sum() / (n2 - 1) - 2 * tr_cross)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between feature sets [n, D]: in feature space, or in sample space when D > n."""
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if max(len(f1), len(f2)) < f1.shape[1]:
        gaussian_stats(f1), gaussian_stats(f2)  # the same shape checks
        return frechet_distance_low_rank(f1, f2)
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def classifier_featurize(net: Classifier) -> Featurize:
    return lambda images: predict(net, images, "features").numpy()


@dataclass
class FidFeatures:
    """Features of the generated samples, the test reference and a train subset (the floor), [n, D] each."""

    gen: np.ndarray
    test: np.ndarray
    train: np.ndarray


def fid_features(featurize: Featurize, samples: torch.Tensor, data: ImageData, n: int, seed: int = 0) -> FidFeatures:
    """Features of n samples (uint8), of n test images (the reference, chosen by seed) and of n train images."""
    if len(samples) < n:
        raise ValueError(f"need {n} samples for n_fid={n}; got {len(samples)}")
    rng = np.random.default_rng(seed)
    test = data.test_images[rng.choice(len(data.test_images), min(n, len(data.test_images)), replace=False)]
    train = data.train_images[rng.choice(len(data.train_images), n, replace=False)]
    return FidFeatures(featurize(samples[:n]), featurize(torch.from_numpy(test)), featurize(torch.from_numpy(train)))


def fid_bootstrap(a: np.ndarray, b: np.ndarray, reps: int, seed: int,
                  minus: np.ndarray | None = None, paired_rows: bool = False) -> Estimate:
    """FID(a, b) (or, with `minus`, FID(a, b) - FID(minus, b): a paired difference on the same reference b)
    with a 95% interval from the bootstrap sd: each replicate resamples every feature set with replacement,
    the shared reference once for both sides. With paired_rows, row i of `a` and of `minus` share a unit (e.g.
    samples drawn from the same x_T seed) and are resampled together: common random numbers on the sample side
    too. A distance's interval is cut at 0 (small n can reach below)."""
    if paired_rows and (minus is None or len(minus) != len(a)):
        raise ValueError("paired_rows needs `minus` with one row per row of `a`")

    def stat(fa: np.ndarray, fb: np.ndarray, fm: np.ndarray | None) -> float:
        return fid_from_features(fa, fb) - (fid_from_features(fm, fb) if fm is not None else 0.0)

    def replicate(rng: np.random.Generator) -> float:
        def pick(f: np.ndarray) -> np.ndarray:
            return f[rng.integers(0, len(f), len(f))]
        if paired_rows:
            rows = rng.integers(0, len(a), len(a))
            return stat(a[rows], pick(b), minus[rows])
        return stat(pick(a), pick(b), pick(minus) if minus is not None else None)

    est = bootstrap(replicate, stat(a, b, minus), reps, seed, len(a))
    return est if minus is not None else replace(est, ci_low=max(0.0, est.ci_low))  # a distance is >= 0


def fid_proxy_report(featurize: Featurize, samples: torch.Tensor, data: ImageData, n: int, seed: int = 0,
                     reps: int = 200) -> dict[str, Any]:
    """fid_proxy of `samples` (uint8) against n test images, with the real-vs-real floor at the same n (see
    report_from_features)."""
    return report_from_features(fid_features(featurize, samples, data, n, seed), seed, reps)


def report_from_features(f: FidFeatures, seed: int = 0, reps: int = 200, fid_key: str = "fid_proxy",
                         kid_key: str = "kid_proxy") -> dict[str, Any]:
    """FID and its floor, each with a bootstrap 95% interval over samples and reference images, and KID with
    its standard error over disjoint subsets, from features of fid_features; keys fid_key, fid_key_floor,
    kid_key, ... (fid_proxy for the classifier's features, fid for Inception's)."""
    n, fk, kk = len(f.gen), fid_key, kid_key
    distance = fid_bootstrap(f.gen, f.test, reps, seed)
    floor = fid_bootstrap(f.train, f.test, reps, seed + 1)
    kid_gen, kid_floor = kid(f.gen, f.test, seed=seed), kid(f.train, f.test, seed=seed)
    return {
        **distance.as_dict(fk), **floor.as_dict(f"{fk}_floor"),
        kk: kid_gen[0], f"{kk}_stderr": kid_gen[1], f"{kk}_floor": kid_floor[0], f"{kk}_floor_stderr": kid_floor[1],
        "n_fid": n, "n_fid_reference": len(f.test), "fid_bootstrap_reps": reps,
    }
