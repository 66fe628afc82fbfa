"""Data sets as uint8 arrays, and the one place where 8-bit pixels become model inputs in [-1, 1].

Images are kept as uint8 [N, C, H, W] until `to_model_range`; samples come back through `from_model_range`.
Sources, all offline except where a user allows a torchvision download:
    fashion_mnist  IDX .gz files in `root`, then /usr/share/datasets/fashion-mnist (Debian dataset-fashion-mnist)
    mnist, cifar10 torchvision's files in `root` (downloaded there only when `download=True`)
    digits         scikit-learn's bundled 8x8 digits (values 0..16 rescaled to 0..255)
"""

from __future__ import annotations

from dataclasses import dataclass
import gzip
import hashlib
from pathlib import Path
import zlib

import numpy as np
import torch

DATASETS = ("fashion_mnist", "mnist", "cifar10", "digits")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DIGITS_TEST = 297  # of 1,797 images; fixed permutation with seed 0


class DataError(RuntimeError):
    """A data set that is missing, truncated, corrupted or cannot be fetched; the message names the file."""


@dataclass(frozen=True)
class ImageData:
    """uint8 images [N, C, H, W] and int64 labels [N] for both splits."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1

    def checksum(self) -> str:
        """sha256 over all four arrays (shapes included): identifies the data a model was trained on."""
        h = hashlib.sha256(self.name.encode())
        for a in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def to_model_range(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixels k in 0..255 -> float32 2k/255 - 1 in [-1, 1] (the 8-bit grid the decoder L_0 assumes)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    return x.float() / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 pixels, rounding to the nearest grid point (values outside are clipped)."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


# --- IDX files ------------------------------------------------------------------------------------------
def read_idx_gz(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (uint8 data, big-endian int32 dims); every defect is a DataError naming it."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"missing data file: {path}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"corrupted or truncated gzip file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)) if len(raw) >= header else ()
    expected = header + int(np.prod(dims)) if dims else None
    if expected is None or len(raw) != expected:
        raise DataError(f"{path} is truncated or padded: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_fashion_mnist(root: Path | None) -> Path:
    candidates = ([Path(root), Path(root) / "fashion-mnist", Path(root) / "fashion_mnist"] if root else [])
    candidates.append(DEBIAN_FASHION_MNIST)
    for c in candidates:
        if (c / FASHION_FILES["train_images"]).exists():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"Fashion-MNIST not found (looked in {looked}). On Debian: apt-get install dataset-fashion-mnist; "
        f"or put {', '.join(FASHION_FILES.values())} in data.root"
    )


def load_fashion_mnist(root: Path | None) -> ImageData:
    folder = find_fashion_mnist(root)
    arrays = {k: read_idx_gz(folder / name) for k, name in FASHION_FILES.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{folder}: {split} has {n_img} images but {n_lab} labels")
    return ImageData(
        "fashion_mnist",
        arrays["train_images"][:, None].copy(), arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None].copy(), arrays["test_labels"].astype(np.int64),
    )


# --- torchvision and scikit-learn ----------------------------------------------------------------------
def load_torchvision(name: str, root: Path | None, download: bool) -> ImageData:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    root = Path(root or "data/torchvision")
    try:
        splits = [cls(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        hint = "set download to true (needs internet)" if not download else "check the internet connection"
        raise DataError(f"{name} not found or corrupted under {root}: {e}; {hint}, "
                        f"or use fashion_mnist / digits offline") from None
    except OSError as e:  # URLError and socket errors when offline
        raise DataError(f"could not download {name} to {root} ({e}); no internet? "
                        f"Use fashion_mnist or digits offline, or copy the files into {root}") from None
    out = []
    for ds in splits:
        images = np.asarray(ds.data, dtype=np.uint8)
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        out += [np.ascontiguousarray(images), np.asarray(ds.targets, dtype=np.int64)]
    return ImageData(name, *out)


def load_digits() -> ImageData:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:DIGITS_TEST], order[DIGITS_TEST:]
    labels = bunch.target.astype(np.int64)
    return ImageData("digits", images[train], labels[train], images[test], labels[test])


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> ImageData:
    """Load a data set by name; `root` is searched first. Raises DataError with the file or reason."""
    if name == "fashion_mnist":
        return load_fashion_mnist(Path(root) if root else None)
    if name in ("mnist", "cifar10"):
        return load_torchvision(name, Path(root) if root else None, download)
    if name == "digits":
        return load_digits()
    raise DataError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
