"""Evaluation metrics against references: scikit-learn, closed-form Gaussians, numpy."""

import numpy as np
import pytest

from cohortcast.evaluation.metrics import (classification_metrics, frechet_distance, frechet_distance_of_features,
                                           over_seeds, running_variance)


def test_classification_metrics_are_sklearns():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = labels + rng.normal(0, 1.0, 200)
    got = classification_metrics(labels, scores)
    assert got == {"auroc": roc_auc_score(labels, scores), "auprc": average_precision_score(labels, scores)}
    assert classification_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["auroc"] == 1.0
    with pytest.raises(ValueError, match="both classes"):
        classification_metrics([1, 1], [0.2, 0.3])


def test_over_seeds_mean_and_std():
    summary = over_seeds([{"auroc": 0.6}, {"auroc": 0.8}])
    assert summary["auroc"].mean == pytest.approx(0.7) and summary["auroc"].std == pytest.approx(0.1)
    assert str(summary["auroc"]) == "0.700 ± 0.100"


def test_frechet_distance_on_known_gaussians():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)).
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # 1-D closed form, and invariance to a shared rotation of both distributions.
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + (2 - 1) ** 2)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    c1, c2 = a @ a.T + np.eye(4), b @ b.T + np.eye(4)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    m1, m2 = rng.normal(size=4), rng.normal(size=4)
    assert frechet_distance(q @ m1, q @ c1 @ q.T, q @ m2, q @ c2 @ q.T) == pytest.approx(
        frechet_distance(m1, c1, m2, c2), rel=1e-6)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_of_features_labels_its_space():
    rng = np.random.default_rng(2)
    same = frechet_distance_of_features(rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3)), "evaluator ViT [CLS]")
    shifted = frechet_distance_of_features(rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3)) + 2.0, "x")
    assert same.feature_space == "evaluator ViT [CLS]" and same.n_real == 4000
    assert same.value < 0.05 and shifted.value == pytest.approx(12.0, rel=0.05)


def test_running_variance_matches_numpy_at_every_count():
    samples = np.random.default_rng(3).normal(size=(20, 5, 5))
    running = running_variance(samples)
    for k in range(2, 21):
        np.testing.assert_allclose(running[k - 1], samples[:k].var(axis=0, ddof=1), rtol=1e-10, atol=1e-12)
    assert (running[0] == 0).all()
