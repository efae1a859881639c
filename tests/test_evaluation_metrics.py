"""Evaluation metrics against references: scikit-learn, closed-form Gaussians, numpy."""

import numpy as np
import pytest

from cohortcast.evaluation.metrics import (
    Interval,
    classification_metrics,
    frechet_distance,
    frechet_distance_of_features,
    mean_auroc,
    over_seeds,
    patient_bootstrap,
    running_variance,
)


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
        frechet_distance(m1, c1, m2, c2), rel=1e-6
    )
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


def test_mean_auroc_is_the_mean_of_sklearns_per_run_including_ties_and_repeats():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 40)
    scores = np.round(labels + rng.normal(0, 1.0, (3, 40)), 1)  # rounding makes ties
    idx = rng.integers(0, 40, 60)  # a bootstrap-style index with repeated cases
    expected = np.mean([roc_auc_score(labels[idx], s[idx]) for s in scores])
    assert mean_auroc(labels[idx], scores[:, idx]) == pytest.approx(expected, abs=1e-12)
    assert mean_auroc(labels, scores[0]) == pytest.approx(roc_auc_score(labels, scores[0]), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        mean_auroc([1, 1, 1], [[0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="labels"):
        mean_auroc([0, 1], [[0.1, 0.2, 0.3]])


def _draws(patients, n_boot, seed):
    """The documented resampling, written independently: sorted unique patients, each
    resample = the cases of every drawn patient, once per draw."""
    unique = sorted(set(patients))
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        drawn = rng.integers(0, len(unique), len(unique))
        yield np.concatenate([[i for i, p in enumerate(patients) if p == unique[k]] for k in drawn]).astype(int)


def test_bootstrap_collapses_to_the_point_value_when_patients_are_identical():
    values = np.array([0.2, 0.7, 0.2, 0.7, 0.2, 0.7])  # every patient has the same two cases
    ci = patient_bootstrap(["a", "a", "b", "b", "c", "c"], lambda idx, v=values: v[idx].mean(), n_boot=200)
    assert ci.low == pytest.approx(0.45) and ci.high == pytest.approx(0.45) and ci.n_boot_used == 200
    single = patient_bootstrap(["p"] * 5, lambda idx: values[idx].sum(), n_boot=50)
    assert single.low == single.high == pytest.approx(values[:5].sum())  # one patient: always all its cases


def test_bootstrap_contains_the_mean_and_narrows_with_more_patients():
    rng = np.random.default_rng(5)
    widths = []
    for n_patients in (20, 320):
        values = rng.normal(1.0, 1.0, 2 * n_patients)
        patients = np.repeat([f"p{i}" for i in range(n_patients)], 2)
        ci = patient_bootstrap(patients, lambda idx, v=values: v[idx].mean(), n_boot=500, seed=1)
        assert ci.low < values.mean() < ci.high
        widths.append(ci.high - ci.low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 16x the patients, ~4x narrower
    assert str(Interval(0.5123, 0.70104, 10)) == "[0.512, 0.701]"


def test_bootstrap_is_deterministic_for_a_seed():
    values = np.random.default_rng(6).normal(size=30)
    patients = [f"p{i // 3}" for i in range(30)]
    stat = lambda idx: values[idx].mean()  # noqa: E731
    assert patient_bootstrap(patients, stat, 300, seed=3) == patient_bootstrap(patients, stat, 300, seed=3)
    assert patient_bootstrap(patients, stat, 300, seed=3) != patient_bootstrap(patients, stat, 300, seed=4)


def test_bootstrap_takes_a_patient_drawn_twice_twice():
    patients = ["a", "b", "b", "c", "c", "c"]  # 1, 2 and 3 cases
    seen = []
    patient_bootstrap(patients, lambda idx: seen.append(np.sort(idx)) or len(idx), n_boot=100, seed=2)
    sizes = [len(idx) for idx in seen]
    assert len(set(sizes)) > 1  # would be constant (6) if duplicates were collapsed or cases drawn singly
    for got, expected in zip(seen, _draws(patients, 100, 2)):
        np.testing.assert_array_equal(got, np.sort(expected))


def test_bootstrap_skips_one_class_resamples_and_refuses_when_most_fail():
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0])  # only patient a is malignant
    patients = ["a", "a", "b", "b", "c", "c", "d", "d"]
    scores = np.linspace(0, 1, 8)[None]
    ci = patient_bootstrap(patients, lambda idx: mean_auroc(labels[idx], scores[:, idx]), n_boot=400, seed=0)
    both = sum(len(set(labels[idx])) == 2 for idx in _draws(patients, 400, 0))
    assert ci.n_boot_used == both and 200 <= both < 400  # (3/4)^4 of resamples miss patient a

    def distinct(idx):
        if len(set(idx)) < len(idx):
            raise ValueError("a patient drawn twice")
        return len(idx)

    with pytest.raises(ValueError, match=r"only \d+ of 300 patient bootstrap resamples"):
        patient_bootstrap(["a", "b", "c"], distinct, n_boot=300)  # 6/27 resamples draw 3 distinct patients
    with pytest.raises(ValueError, match="n_boot"):
        patient_bootstrap(["a"], len, n_boot=0)
    with pytest.raises(ValueError, match="non-empty"):
        patient_bootstrap([], len)
