"""The metric formulas of guided.evaluation.metrics on features whose answers are known in closed form."""

import numpy as np
import pytest

from guided.errors import GuidedError
from guided.evaluation.metrics import (feature_stats, frechet_distance, inception_score, manifold_radii,
                            precision_recall)


def test_frechet_diagonal_matches_closed_form():
    # For diagonal covariances, Tr(s1 + s2 - 2 sqrt(s1 s2)) = sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_commuting_covariances_match_closed_form():
    # Covariances sharing eigenvectors Q: the distance depends only on the eigenvalues.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = np.zeros(5), np.full(5, 0.5)
    expected = 5 * 0.25 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero():
    acts = np.random.default_rng(2).normal(size=(500, 16)).astype(np.float32)
    mu, sigma = feature_stats(acts)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_feature_stats_matches_numpy_cov_in_chunks():
    acts = np.random.default_rng(3).normal(size=(101, 7)).astype(np.float32)
    mu, sigma = feature_stats(acts, chunk=10)
    np.testing.assert_allclose(mu, acts.astype(np.float64).mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(acts.astype(np.float64), rowvar=False), atol=1e-10)


def test_frechet_rejects_mismatched_statistics():
    with pytest.raises(GuidedError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(GuidedError):
        feature_stats(np.zeros((1, 3)))


def test_inception_score_of_uniform_classifier_is_one():
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 7, 10])
def test_inception_score_of_one_hot_classifier_is_number_of_classes(k):
    probs = np.eye(k)[np.arange(20 * k) % k]
    assert inception_score(probs) == pytest.approx(k)


def test_inception_score_averages_splits():
    # split 1: 4 one-hot classes (IS 4), split 2: uniform (IS 1) -> mean 2.5, as the evaluator.
    probs = np.concatenate([np.eye(4)[np.arange(8) % 4], np.full((8, 4), 0.25)])
    assert inception_score(probs, split_size=8) == pytest.approx(2.5)


def test_manifold_radii_match_brute_force():
    x = np.random.default_rng(4).normal(size=(50, 3)).astype(np.float32)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = np.sort(d, 1)[:, 3]  # index 0 is the point itself
    np.testing.assert_allclose(manifold_radii(x, k=3, block=7).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(5).normal(size=(200, 8))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_clusters_is_zero():
    rng = np.random.default_rng(6)
    ref, smp = rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 100.0
    assert precision_recall(ref, smp) == (0.0, 0.0)


def test_samples_covering_half_the_reference_give_recall_one_half():
    rng = np.random.default_rng(7)
    ref = np.concatenate([rng.normal(size=(100, 2)), rng.normal(size=(100, 2)) + 50.0])
    precision, recall = precision_recall(ref, ref[:100].copy(), k=3)
    assert precision == 1.0 and recall == 0.5


def test_precision_recall_is_the_same_in_small_blocks():
    rng = np.random.default_rng(8)
    ref, smp = rng.normal(size=(120, 5)), rng.normal(size=(90, 5)) * 1.5 + 0.5
    whole = precision_recall(ref, smp)
    assert 0 < whole[0] < 1 and 0 < whole[1] < 1
    assert precision_recall(ref, smp, block=16) == whole


def test_precision_recall_needs_k_plus_one_points():
    x = np.zeros((3, 2))
    with pytest.raises(GuidedError, match="at least 4"):
        precision_recall(x, np.ones((10, 2)), k=3)
    with pytest.raises(GuidedError, match="differ in size"):
        precision_recall(np.ones((10, 2)), np.ones((10, 3)))


def test_summarize_over_seeds():
    from guided.evaluation.metrics import summarize
    s = summarize([3.0, 1.0, 2.0])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([5.0])["std"] is None and summarize([])["n"] == 0


def test_fd_count_warnings_thresholds():
    from guided.evaluation.metrics import fd_count_warnings
    assert fd_count_warnings("FID", 64, 1000, 1000) == []
    assert fd_count_warnings("FID", 2048, 1500, None)[0].startswith(
        "FID from 1500 samples (fewer than its 2048 feature dimensions")
    below = fd_count_warnings("FID", 64, 999, 5000)
    assert len(below) == 1 and "under 1,000" in below[0]
    assert len(fd_count_warnings("FID", 64, 10, 10)) == 2  # samples and reference
