"""Data: IDX parsing, clear errors naming the file, the [-1, 1] scaling, digits."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_core import data as d


def write_idx(path: Path, arr: np.ndarray, truncate: int = 0) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - truncate])


def fake_fashion(folder: Path, n_train=6, n_test=4, truncate_file=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": np.arange(n_train) % 10,
              "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": np.arange(n_test) % 10}
    for key, name in d.FASHION_FILES.items():
        write_idx(folder / name, arrays[key], truncate=5 if key == truncate_file else 0)


def test_reads_idx_files_from_the_configured_root_first(tmp_path):
    fake_fashion(tmp_path / "fm")
    data = d.load_dataset("fashion_mnist", root=tmp_path / "fm")
    assert data.train_images.shape == (6, 1, 28, 28) and data.train_images.dtype == np.uint8
    assert data.test_labels.tolist() == [0, 1, 2, 3] and data.image_shape == (1, 28, 28)


def test_truncated_file_is_a_clear_error_naming_it(tmp_path):
    fake_fashion(tmp_path, truncate_file="test_images")
    with pytest.raises(d.DataError, match=r"t10k-images-idx3-ubyte.gz is truncated"):
        d.load_dataset("fashion_mnist", root=tmp_path)


def test_corrupted_gzip_is_a_clear_error_naming_it(tmp_path):
    fake_fashion(tmp_path)
    path = tmp_path / d.FASHION_FILES["train_labels"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:] = b"\x00" * (len(raw) - len(raw) // 2)
    path.write_bytes(bytes(raw))
    with pytest.raises(d.DataError, match=r"train-labels-idx1-ubyte.gz"):
        d.load_dataset("fashion_mnist", root=tmp_path)


def test_bad_magic_and_missing_files(tmp_path):
    fake_fashion(tmp_path)
    with gzip.open(tmp_path / d.FASHION_FILES["train_images"], "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(d.DataError, match="bad magic number"):
        d.load_dataset("fashion_mnist", root=tmp_path)
    (tmp_path / d.FASHION_FILES["test_labels"]).unlink()
    with pytest.raises(d.DataError, match="missing data file: .*t10k-labels"):
        d.read_idx_gz(tmp_path / d.FASHION_FILES["test_labels"])


def test_missing_data_set_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(d, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(d.DataError, match=r"Fashion-MNIST not found \(looked in .*apt-get install dataset-fashion-mnist"):
        d.load_dataset("fashion_mnist", root=tmp_path / "empty")


@pytest.mark.skipif(not (d.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist():
    data = d.load_dataset("fashion_mnist")
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10 and np.bincount(data.test_labels).tolist() == [1000] * 10


def test_digits_split_is_fixed_and_uses_the_full_8bit_range():
    a, b = d.load_digits(), d.load_digits()
    assert a.train_images.shape == (1500, 1, 8, 8) and a.test_images.shape == (297, 1, 8, 8)
    assert np.array_equal(a.test_images, b.test_images) and a.checksum() == b.checksum()
    assert a.train_images.max() == 255 and a.train_images.min() == 0


def test_model_range_round_trips_every_pixel_value():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = d.to_model_range(u8)
    assert x.min() == -1 and x.max() == 1
    torch.testing.assert_close(x.flatten(), torch.arange(256) * 2 / 255 - 1)
    assert torch.equal(d.from_model_range(x), u8)
    assert torch.equal(d.from_model_range(x + 0.003), u8)  # less than half a bin
    with pytest.raises(TypeError):
        d.to_model_range(torch.zeros(2))


def test_offline_torchvision_is_a_clear_error(tmp_path):
    with pytest.raises(d.DataError, match="mnist not found or corrupted under .*download"):
        d.load_dataset("mnist", root=tmp_path)
    with pytest.raises(d.DataError, match="unknown data set 'svhn'"):
        d.load_dataset("svhn")


def test_checksum_changes_with_the_data(tmp_path):
    a = d.load_digits()
    b = d.ImageData(a.name, a.train_images.copy(), a.train_labels, a.test_images, a.test_labels)
    b.train_images[0, 0, 0, 0] ^= 1
    assert a.checksum() != b.checksum()
