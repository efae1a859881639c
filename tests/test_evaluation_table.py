"""Table 1 assembly, the paper's claims, the feature networks and the variance figures,
on synthetic arrays with known answers (no Ray, seconds)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from cohortcast.evaluation.feature_networks import INCEPTION_SPACE, inception_features, lpips_distances
from cohortcast.evaluation.report import _table_json
from cohortcast.evaluation.table import Method, compute_table, difference_claims, error_claims, paper_claims
from cohortcast.evaluation.variance import case_variance, plot_error_variance, plot_running_variance, plot_variance_maps

RNG = np.random.default_rng(0)
N_CASES, N_SEEDS, SIDE = 24, 5, 16
LABELS = np.array([0, 1] * (N_CASES // 2))


def brightness(images: np.ndarray) -> np.ndarray:
    """A stand-in evaluator: P(malignant) grows with mean intensity."""
    return 1 / (1 + np.exp(-images.reshape(len(images), -1).mean(1) * 4))


def flat_features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1)[:, :6]


def images_with_signal(strength: float) -> np.ndarray:
    """Each case's brightness = label signal + a per-case offset (so AUROC stays below 1)."""
    offset = RNG.normal(0, 0.3, (N_CASES, 1, 1))
    noise = RNG.normal(0, 0.3, (N_CASES, SIDE, SIDE))
    return (offset + noise + strength * (LABELS[:, None, None] - 0.5)).astype(np.float32)


def test_table_matches_sklearn_per_seed_and_real_rows_have_one_run():
    baseline, follow_up = images_with_signal(0.1), images_with_signal(1.0)
    runs = [images_with_signal(0.5) for _ in range(N_SEEDS)]
    methods = [
        Method("baseline", [baseline], generated=False),
        Method("follow-up", [follow_up], generated=False),
        Method("model", runs, generated=True),
        Method("copy", [baseline], generated=True),
    ]
    table = compute_table(methods, LABELS, follow_up, brightness, flat_features, "pixels", None, "n/a")
    per_seed = [roc_auc_score(LABELS, brightness(r)) for r in runs]
    model = table.row("model")
    assert model.auroc.mean == pytest.approx(np.mean(per_seed)) and model.auroc.std == pytest.approx(np.std(per_seed))
    assert model.auprc.mean == pytest.approx(np.mean([average_precision_score(LABELS, brightness(r)) for r in runs]))
    assert model.auroc.n == N_SEEDS and model.probabilities.shape == (N_SEEDS, N_CASES)
    assert table.row("baseline").auroc.std == 0 and table.row("baseline").lpips is None
    assert table.row("baseline").frechet is None  # real images: no image metric against themselves
    # Copy-the-baseline is judged on the same images as the real baseline.
    assert table.row("copy").auroc.mean == table.row("baseline").auroc.mean
    assert table.row("copy").frechet is not None and model.frechet is not None
    assert table.row("follow-up").auroc.mean > model.auroc.mean > table.row("baseline").auroc.mean
    claims = paper_claims(table, "model", None, "baseline", "follow-up")
    assert [c.holds for c in claims] == [True, True]
    assert "pixels" in table.markdown() and "| model |" in table.markdown()


def test_claims_report_a_broken_ordering():
    follow_up = images_with_signal(1.0)
    methods = [
        Method("baseline", [images_with_signal(1.5)], generated=False),
        Method("follow-up", [follow_up], generated=False),
        Method("model", [images_with_signal(0.0)], generated=True),
        Method("ablation", [images_with_signal(1.5)], generated=True),
    ]
    table = compute_table(methods, LABELS, follow_up, brightness, flat_features, "pixels", None, "n/a")
    claims = {c.text: c.holds for c in paper_claims(table, "model", "ablation", "baseline", "follow-up")}
    assert claims == {"baseline < model": False, "model <= follow-up": True, "ablation < model": False}


def test_frechet_is_zero_for_identical_sets_and_lpips_zero_for_identical_images(tmp_path):
    from cohortcast.models.perceptual import LPIPS

    follow_up = images_with_signal(1.0)
    torch.manual_seed(0)
    net = LPIPS()
    for k in range(5):  # trained LPIPS heads are non-negative (lpips clamps them)
        getattr(net, f"lin{k}").model[1].weight.data.abs_()
    vgg = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in net.state_dict().items() if k.startswith("lin")}, tmp_path / "lpips_vgg.pth")
    lpips = lpips_distances(tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth", batch_size=8)
    assert np.allclose(lpips(follow_up, follow_up), 0, atol=1e-6)
    other = images_with_signal(0.0)
    assert (lpips(other, follow_up) > 0).all()
    methods = [Method("same", [follow_up], generated=True), Method("other", [other], generated=True)]
    table = compute_table(methods, LABELS, follow_up, brightness, flat_features, "pixels", lpips, "LPIPS (VGG16)")
    assert table.row("same").frechet.mean == pytest.approx(0, abs=1e-4)
    assert table.row("other").frechet.mean > 0.1 and table.row("other").lpips.mean > 0


class _FakeInception(torch.nn.Module):
    """The call signature of the FID Inception TorchScript file."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert images.shape[1] == 3
        return torch.stack([images.mean((1, 2, 3)), images.amax((1, 2, 3)), images.amin((1, 2, 3))], 1)


def test_inception_torchscript_is_called_on_0_255_rgb(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    features = inception_features(path, batch_size=4)(np.array([[[-1.0, 1.0]], [[0.0, 0.0]]], np.float32))
    assert np.allclose(features, [[127.5, 255, 0], [127.5, 127.5, 127.5]])
    assert "inception" in INCEPTION_SPACE.lower()
    with pytest.raises(FileNotFoundError, match="inception_torchscript"):
        inception_features(tmp_path / "missing.pt", batch_size=4)


def test_case_variance_and_figures(tmp_path):
    probs = RNG.uniform(0, 1, (N_SEEDS, N_CASES))
    cv = case_variance([f"p{i}/n1" for i in range(N_CASES)], LABELS, probs)
    assert np.allclose(cv.mean_probability, probs.mean(0)) and np.allclose(cv.variance, probs.var(0, ddof=1))
    assert np.allclose(cv.error, np.abs(probs.mean(0) - LABELS))
    images = RNG.normal(0, 0.5, (N_CASES, SIDE, SIDE))
    paths = [
        plot_error_variance(cv, tmp_path / "a.png"),
        plot_running_variance(probs, 10, 0, tmp_path / "b.png"),
        plot_variance_maps(cv, images, images, images**2, images, 4, tmp_path / "c.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def _patients(rng, n_cases):
    """1-3 cases per patient, as nodules cluster in patients."""
    sizes = []
    while sum(sizes) < n_cases:
        sizes.append(int(rng.integers(1, 4)))
    return [f"p{k}" for k, size in enumerate(sizes) for _ in range(size)][:n_cases]


def test_auroc_ci_and_paired_difference_match_a_direct_patient_bootstrap():
    rng = np.random.default_rng(11)
    labels = rng.permutation(LABELS)
    patients = _patients(rng, N_CASES)

    def signal(s):
        return (
            rng.normal(0, 0.3, (N_CASES, 1, 1))
            + rng.normal(0, 0.3, (N_CASES, SIDE, SIDE))  # noqa
            + s * (labels[:, None, None] - 0.5)
        ).astype(np.float32)  # AUROCs well inside (0.5, 1)

    model_runs, baseline = [signal(0.4) for _ in range(3)], signal(0.1)
    methods = [Method("baseline", [baseline], generated=False), Method("model", model_runs, generated=True)]
    table = compute_table(
        methods,
        labels,
        signal(1.0),
        brightness,
        flat_features,
        "pixels",
        None,
        "n/a",
        patients=patients,
        n_boot=200,
        boot_seed=7,
        differences=[("model", "baseline")],
    )

    def auroc(runs, idx):
        return np.mean([roc_auc_score(labels[idx], brightness(r)[idx]) for r in runs])

    unique, gen = sorted(set(patients)), np.random.default_rng(7)
    ci_model, diffs = [], []
    for _ in range(200):
        drawn = gen.integers(0, len(unique), len(unique))
        idx = np.concatenate([[i for i, p in enumerate(patients) if p == unique[k]] for k in drawn]).astype(int)
        if len(set(labels[idx])) < 2:
            continue
        ci_model.append(auroc(model_runs, idx))
        diffs.append(auroc(model_runs, idx) - auroc([baseline], idx))
    model_ci = table.row("model").auroc_ci
    assert 0.5 < table.row("baseline").auroc.mean < table.row("model").auroc.mean < 0.95  # a non-trivial example
    assert (model_ci.low, model_ci.high) == pytest.approx(tuple(np.percentile(ci_model, [2.5, 97.5])), abs=1e-9)
    assert model_ci.n_boot_used == len(ci_model)
    (d,) = table.differences
    assert (d.a, d.b, d.interval.n_boot_used) == ("model", "baseline", len(diffs))
    assert (d.interval.low, d.interval.high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-9)
    assert d.mean == pytest.approx(auroc(model_runs, np.arange(N_CASES)) - auroc([baseline], np.arange(N_CASES)))
    md = table.markdown()
    assert f"[{model_ci.low:.2f}, {model_ci.high:.2f}]" in md and "AUROC ↑ [95% CI]" in md
    sign = "+" if d.mean >= 0 else "−"
    assert (
        f"AUROC difference model − baseline: {sign}{abs(d.mean):.3f} [" in md
    ) and f"(patient bootstrap, {len(diffs)}" in md
    (claim,) = difference_claims(table)
    assert claim.text == "model − baseline AUROC CI excludes 0" and claim.holds == (d.interval.low > 0)
    as_json = _table_json(table)
    assert as_json["differences"][0]["low"] == d.interval.low
    assert as_json["rows"][1]["auroc_ci"]["high"] == model_ci.high


def test_forecast_errors_match_numpy_and_missing_ones_show_a_dash():
    rng = np.random.default_rng(12)
    follow_up, baseline = images_with_signal(1.0), images_with_signal(0.1)
    runs = [images_with_signal(0.5) for _ in range(3)]
    mean_image = np.mean(runs, axis=0)
    latent, target_latents = rng.normal(size=(N_CASES, 2, 4, 4)), rng.normal(size=(N_CASES, 2, 4, 4))
    masks = rng.random((N_CASES, SIDE, SIDE)) < 0.2
    masks[3] = False  # no nodule region: skipped, not counted as 0 or NaN
    methods = [
        Method("baseline", [baseline], generated=False),
        Method("model", runs, generated=True, mean_image=mean_image, latent=latent),
        Method("copy", [baseline], generated=True, mean_image=baseline),
    ]
    table = compute_table(
        methods,
        LABELS,
        follow_up,
        brightness,
        flat_features,
        "pixels",
        None,
        "n/a",
        target_latents=target_latents,
        region_masks=masks,
    )
    model, copy = table.row("model"), table.row("copy")
    assert model.mae == pytest.approx(np.mean([np.abs(mean_image[i] - follow_up[i]).mean() for i in range(N_CASES)]))
    assert model.region_mae == pytest.approx(
        np.mean([np.abs(mean_image[i] - follow_up[i])[masks[i]].mean() for i in range(N_CASES) if i != 3])
    )
    assert model.latent_error == pytest.approx(np.abs(latent - target_latents).mean())
    assert copy.mae == pytest.approx(np.abs(baseline.astype(np.float64) - follow_up).mean())
    assert copy.latent_error is None and model.auroc_ci is None and table.differences == []
    assert table.row("baseline").mae is table.row("baseline").region_mae is None
    md = table.markdown()
    assert "| MAE ↓ | nodule MAE ↓ | latent error ↓ | LPIPS ↓ | Fréchet distance ↓ (pixels) |" in md
    baseline_cells = next(line for line in md.splitlines() if line.startswith("| baseline |")).split(" | ")
    assert baseline_cells[3:6] == ["–", "–", "–"]
    assert f"| {model.mae:.4f} | {model.region_mae:.4f} | {model.latent_error:.4f} |" in md
    claims = {c.text: (c.holds, c.detail) for c in error_claims(table, "model", ["copy", "baseline", "absent"])}
    assert claims == {"model mean-forecast MAE < copy": (model.mae < copy.mae, f"{model.mae:.4f} vs {copy.mae:.4f}")}
    row = _table_json(table)["rows"][1]
    assert (row["mae"], row["region_mae"], row["latent_error"], row["auroc_ci"]) == (
        model.mae,
        model.region_mae,
        model.latent_error,
        None,
    )


def test_compute_table_rejects_inconsistent_inputs():
    follow_up = images_with_signal(1.0)
    methods = [Method("a", [follow_up], generated=False), Method("b", [follow_up], generated=True)]
    args = (methods, LABELS, follow_up, brightness, flat_features, "pixels", None, "n/a")
    with pytest.raises(ValueError, match="patients has shape"):
        compute_table(*args, patients=["p"] * (N_CASES - 1))
    with pytest.raises(ValueError, match="not in the table"):
        compute_table(*args, patients=["p"] * N_CASES, differences=[("a", "c")])
    with pytest.raises(ValueError, match="need patients"):
        compute_table(*args, differences=[("a", "b")])
    bad = [Method("a", [follow_up], generated=True, mean_image=follow_up[:, :4])]
    with pytest.raises(ValueError, match="a mean_image has shape"):
        compute_table(bad, *args[1:])
