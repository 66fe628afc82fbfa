"""The standard FID: pytorch-fid's FID Inception-v3 features from a weights file, offline, and its distance.

No test needs the real weights: a file of the right shapes filled with random numbers checks the plumbing
(architecture, preprocessing, loading) against pytorch-fid itself, run with the same file.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch

from ddpm_core.checkpoint import CheckpointError
from ddpm_core.data import load_digits
from ddpm_core.fid import fid_from_features, frechet_distance, frechet_distance_low_rank, gaussian_stats
from ddpm_core.inception import (FEATURE_DIM, WEIGHTS_FILE, WEIGHTS_URL, MissingWeightsError, find_weights,
                                 inception_featurize, load_inception)

from helpers import random_inception_weights


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    random_inception_weights(path)
    return path


@pytest.mark.parametrize("n,d", [(300, 40), (30, 40)])
def test_frechet_distance_equals_pytorch_fids(n, d):
    """Same statistics, same number: well-conditioned (n > d) and singular covariances (n < d)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = 0.7 * rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.3
    theirs = calculate_frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert frechet_distance(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(theirs, rel=1e-7)
    assert frechet_distance_low_rank(a, b) == pytest.approx(theirs, rel=1e-7)   # the sample-space path
    assert fid_from_features(a, b) == pytest.approx(theirs, rel=1e-7)


def test_the_sample_space_path_is_what_2048_d_features_of_few_images_take():
    """n < D: fid_from_features works in sample space and agrees with feature space (whose 2048 x 2048
    eigendecompositions of rank-59 matrices add the square roots of round-off: 3.5e-8 relative here)."""
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(60, 2048)), 1.1 * rng.normal(size=(50, 2048)) + 0.05
    assert fid_from_features(a, b) == pytest.approx(frechet_distance(*gaussian_stats(a), *gaussian_stats(b)),
                                                    rel=1e-7)


def test_features_equal_pytorch_fids_with_the_same_weights(random_weights, tmp_path, monkeypatch):
    """Gray uint8 images through our featurizer, and as PNG files through pytorch-fid's own get_activations
    (PIL RGB conversion, ToTensor, its InceptionV3 resizing and scaling) with the same weights file."""
    import pytorch_fid.inception as pf_inception
    from pytorch_fid.fid_score import get_activations

    images = torch.from_numpy(load_digits().test_images[:3])         # uint8 [3, 1, 8, 8]
    files = []
    for i, img in enumerate(images.numpy()):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(img[0]).save(files[-1])
    state = torch.load(random_weights, weights_only=True)
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: state)  # no download
    theirs = get_activations([str(f) for f in files], pf_inception.InceptionV3([3]), batch_size=3, dims=FEATURE_DIM,
                             device="cpu", num_workers=0)
    ours = inception_featurize(random_weights)(images)
    assert ours.shape == (3, FEATURE_DIM) and ours.dtype == np.float64
    assert np.isfinite(ours).all() and ours.std(axis=0).mean() > 0.01 * np.abs(ours).mean()  # not vacuous
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_missing_weights_are_one_line_saying_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    cache = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE
    with pytest.raises(MissingWeightsError) as e:
        find_weights(None)
    assert "\n" not in str(e.value) and str(cache) in str(e.value) and "evaluate.inception_weights" in str(e.value)
    with pytest.raises(MissingWeightsError, match=f"not found at {tmp_path / 'nope.pth'}"):
        find_weights(tmp_path / "nope.pth", download=True)   # a named file is never replaced by a download


def test_weights_come_from_the_named_file_the_cache_or_an_allowed_download(random_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert find_weights(random_weights) == random_weights
    cache = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE
    fetched = []

    def fake_download(url, progress=True, check_hash=False):
        fetched.append((url, check_hash))
        cache.parent.mkdir(parents=True)
        cache.write_bytes(random_weights.read_bytes())

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    assert find_weights(None, download=True) == cache and fetched == [(WEIGHTS_URL, True)]
    assert find_weights(None) == cache and len(fetched) == 1               # cached: no second download


def test_a_damaged_or_foreign_weights_file_is_refused_in_one_line(random_weights, tmp_path):
    named = tmp_path / WEIGHTS_FILE
    named.write_bytes(random_weights.read_bytes())                          # right name, wrong hash
    with pytest.raises(CheckpointError, match=f"{named} is damaged: its sha256 starts"):
        load_inception(named)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="is not pytorch-fid's FID Inception state dict"):
        load_inception(other)
