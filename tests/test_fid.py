"""FID-proxy: Frechet distance closed forms, KID, the featurizer's training, reuse and report."""

import numpy as np
import pytest
import torch

from ddpm_core.checkpoint import CheckpointError
from ddpm_core.data import load_digits
from ddpm_core.fid import (FeaturizerConfig, classifier_featurize, fid_from_features, fid_proxy_report,
                           fid_bootstrap, frechet_distance, kid, load_or_train_featurizer)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(mu, np.eye(6), mu + 2, np.eye(6)) == pytest.approx(24.0)
    d1, d2 = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)  # diagonal: sum (sqrt(a) - sqrt(b))^2
    expected = ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu, np.diag(d1), mu, np.diag(d2)) == pytest.approx(expected, rel=1e-9)
    b = rng.normal(size=(6, 6))
    s2 = b @ b.T + 0.1 * np.eye(6)
    assert frechet_distance(mu, sigma, mu, s2) == pytest.approx(frechet_distance(mu, s2, mu, sigma), rel=1e-8)


def test_fid_and_kid_from_samples():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
    z = rng.normal(loc=1.0, size=(4000, 4))
    assert fid_from_features(x, y) < 0.02
    assert fid_from_features(x, z) == pytest.approx(4.0, rel=0.05)
    assert abs(kid(x, y)[0]) < 0.01 and kid(x, z)[0] > 0.1


def test_kid_standard_error_is_over_disjoint_subsets():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(1000, 4)), rng.normal(size=(1000, 4))
    mean, se = kid(x, y, subsets=10)
    assert se > 0 and abs(mean) < 4 * se
    # the spread of the KID over independent data sets agrees with the reported standard error
    draws = [kid(rng.normal(size=(1000, 4)), rng.normal(size=(1000, 4)), seed=i) for i in range(40)]
    spread, typical_se = np.std([d[0] for d in draws], ddof=1), np.mean([d[1] for d in draws])
    assert 0.6 < typical_se / spread < 1.6
    with pytest.raises(ValueError, match="at least 20 points"):
        kid(x[:15], y, subsets=10)


def test_fid_bootstrap_interval_matches_the_spread_over_data_sets():
    rng = np.random.default_rng(3)
    shift = np.array([0.5, 0, 0, 0])
    point = fid_bootstrap(rng.normal(size=(300, 4)) + shift, rng.normal(size=(300, 4)), reps=200, seed=0)
    assert point.ci_low < point.mean < point.ci_high
    assert point.ci_high - point.ci_low == pytest.approx(2 * 1.959964 * point.stderr, rel=1e-6)
    repeats = [fid_from_features(rng.normal(size=(300, 4)) + shift, rng.normal(size=(300, 4))) for _ in range(60)]
    assert 0.6 < point.stderr / np.std(repeats, ddof=1) < 1.6


def test_a_distance_interval_stays_at_or_above_zero():
    rng = np.random.default_rng(5)
    small = fid_bootstrap(rng.normal(size=(12, 4)), rng.normal(size=(12, 4)), reps=100, seed=0)
    assert small.ci_low >= 0 and small.ci_high > small.mean > 0


def test_fid_paired_difference():
    rng = np.random.default_rng(4)
    ref, a = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
    b = rng.normal(size=(400, 4)) + np.array([0.6, 0, 0, 0])
    same = fid_bootstrap(a, ref, reps=100, seed=1, minus=a)  # the two sides resample independently
    assert same.mean == 0 and same.ci_low < 0 < same.ci_high
    diff = fid_bootstrap(b, ref, reps=200, seed=1, minus=a)
    assert diff.mean == pytest.approx(fid_from_features(b, ref) - fid_from_features(a, ref))
    assert diff.excludes_zero and diff.ci_low > 0


def test_fid_difference_paired_by_rows():
    """Rows of a and minus that share a unit (the same x_T) resample together: identical sets give exactly 0,
    and two samplers that move each unit a little are resolved where independent resampling is not."""
    rng = np.random.default_rng(5)
    ref, shared = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    same = fid_bootstrap(shared, ref, reps=50, seed=1, minus=shared, paired_rows=True)
    assert same.mean == 0 and same.ci_low == 0 == same.ci_high
    a = shared + 0.05 * rng.normal(size=(300, 4))
    b = shared + 0.05 * rng.normal(size=(300, 4)) + np.array([0.25, 0, 0, 0])
    paired = fid_bootstrap(b, ref, reps=200, seed=2, minus=a, paired_rows=True)
    unpaired = fid_bootstrap(b, ref, reps=200, seed=2, minus=a)
    assert paired.mean == unpaired.mean
    assert paired.ci_high - paired.ci_low < 0.8 * (unpaired.ci_high - unpaired.ci_low)  # 0.16 against 0.23 here
    with pytest.raises(ValueError, match="paired_rows needs"):
        fid_bootstrap(a, ref, reps=10, seed=0, paired_rows=True)


@pytest.fixture(scope="module")
def digits_featurizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("feat") / "featurizer.pt"
    data = load_digits()
    cfg = FeaturizerConfig(epochs=4, batch_size=64, width=16, feature_dim=32)
    net, info = load_or_train_featurizer(path, data, cfg, progress=False)
    return path, data, cfg, net, info


def test_featurizer_learns_the_classes_and_is_reused(digits_featurizer):
    path, data, cfg, net, info = digits_featurizer
    assert info["accuracy"] > 0.85 and info["data_checksum"] == data.checksum()
    mtime = path.stat().st_mtime_ns
    net2, info2 = load_or_train_featurizer(path, data, cfg, progress=False)
    assert path.stat().st_mtime_ns == mtime and info2 == info
    x = torch.from_numpy(data.test_images[:20])
    np.testing.assert_array_equal(classifier_featurize(net)(x), classifier_featurize(net2)(x))


def test_featurizer_of_another_config_is_refused_when_training_is_not_allowed(digits_featurizer, tmp_path):
    path, data, cfg, _, _ = digits_featurizer
    other = FeaturizerConfig(epochs=5, batch_size=64, width=16, feature_dim=32)
    with pytest.raises(CheckpointError, match="trained on other data or another config"):
        load_or_train_featurizer(path, data, other, progress=False, train_missing=False)
    with pytest.raises(CheckpointError, match="missing"):
        load_or_train_featurizer(tmp_path / "none.pt", data, cfg, progress=False, train_missing=False)


def test_featurizer_training_is_deterministic(digits_featurizer, tmp_path):
    _, data, cfg, net, info = digits_featurizer
    _, info2 = load_or_train_featurizer(tmp_path / "again.pt", data, cfg, progress=False)
    assert info2["accuracy"] == info["accuracy"]


def test_report_orders_real_noise_and_floor(digits_featurizer):
    _, data, _, net, info = digits_featurizer
    featurize = classifier_featurize(net)
    n = 200
    real = torch.from_numpy(data.train_images[-n:])
    noise = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    good, bad = fid_proxy_report(featurize, real, data, n), fid_proxy_report(featurize, noise, data, n)
    assert bad["fid_proxy"] > 5 * good["fid_proxy"]
    assert good["fid_proxy_floor"] == bad["fid_proxy_floor"] and good["n_fid"] == n
    assert bad["kid_proxy"] > good["kid_proxy"]
    for r in (good, bad):
        assert r["fid_proxy_ci_low"] < r["fid_proxy"] < r["fid_proxy_ci_high"]
        assert r["fid_proxy_floor_ci_low"] < r["fid_proxy_floor"] < r["fid_proxy_floor_ci_high"]
        assert r["kid_proxy_stderr"] > 0
    assert bad["fid_proxy_ci_low"] > good["fid_proxy_ci_high"]
    with pytest.raises(ValueError, match="need 300 samples"):
        fid_proxy_report(featurize, real, data, 300)

