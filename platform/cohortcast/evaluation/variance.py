"""Prediction variance (NAMD Sec. 4.3, App. D): per case the mean malignancy probability
over the N samples, its error against the label and its variance; the running variance
against the number of samples; pixel-variance maps. Figures are PNG files (matplotlib,
Agg backend: no display needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cohortcast.evaluation.metrics import running_variance


@dataclass
class CaseVariance:
    case_ids: list[str]
    labels: np.ndarray  # (n,)
    mean_probability: np.ndarray  # (n,)
    error: np.ndarray  # (n,) |mean probability - label|
    variance: np.ndarray  # (n,) unbiased variance of the probability over samples

    def rows(self) -> list[dict]:
        return [
            {"case_id": c, "label": int(y), "mean_probability": float(p), "error": float(e), "variance": float(v)}
            for c, y, p, e, v in zip(self.case_ids, self.labels, self.mean_probability, self.error, self.variance)
        ]


def case_variance(case_ids: list[str], labels: np.ndarray, probabilities: np.ndarray) -> CaseVariance:
    """probabilities (N samples, n cases)."""
    probabilities = np.asarray(probabilities, np.float64)
    mean = probabilities.mean(0)
    variance = probabilities.var(0, ddof=1) if len(probabilities) > 1 else np.zeros_like(mean)
    labels = np.asarray(labels)
    return CaseVariance(list(case_ids), labels, mean, np.abs(mean - labels), variance)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_variance(cv: CaseVariance, path: Path) -> Path:
    """Fig. 3 (left): error against variance, benign and malignant cases."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, colour, name in ((0, "tab:blue", "benign"), (1, "tab:red", "malignant")):
        keep = cv.labels == label
        ax.scatter(cv.variance[keep], cv.error[keep], c=colour, s=18, label=f"{name} ({int(keep.sum())})")
    ax.set_xlabel("variance of P(malignant) over samples")
    ax.set_ylabel("|mean P(malignant) - label|")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_running_variance(probabilities: np.ndarray, cases: int, seed: int, path: Path) -> Path:
    """App. D, Fig. 5: running variance of each case's probability against the number of
    samples, for up to `cases` randomly drawn cases."""
    plt = _pyplot()
    probabilities = np.asarray(probabilities)
    rng = np.random.default_rng(seed)
    pick = rng.choice(probabilities.shape[1], size=min(cases, probabilities.shape[1]), replace=False)
    running = running_variance(probabilities[:, pick])  # (N, k)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(np.arange(1, len(running) + 1), running, lw=0.8, alpha=0.7)
    ax.set_xlabel("number of samples")
    ax.set_ylabel("running variance of P(malignant)")
    ax.set_title(f"{len(pick)} cases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_variance_maps(
    cv: CaseVariance,
    baseline: np.ndarray,
    mean: np.ndarray,
    pixel_variance: np.ndarray,
    follow_up: np.ndarray,
    cases: int,
    path: Path,
) -> Path:
    """Fig. 3 (right): for cases from confident to unsure (sorted by probability
    variance): baseline | mean forecast | pixel variance | |mean - follow-up| | follow-up."""
    plt = _pyplot()
    order = np.argsort(cv.variance)
    pick = order[np.linspace(0, len(order) - 1, min(cases, len(order))).round().astype(int)]
    columns = ("baseline", "mean forecast", "pixel variance", "|mean - follow-up|", "real follow-up")
    fig, axes = plt.subplots(len(pick), len(columns), figsize=(2 * len(columns), 2 * len(pick)), squeeze=False)
    for row, i in enumerate(pick):
        images = (baseline[i], mean[i], pixel_variance[i], np.abs(mean[i] - follow_up[i]), follow_up[i])
        for col, image in enumerate(images):
            ax = axes[row, col]
            grey = col in (0, 1, 4)
            ax.imshow(image, cmap="gray" if grey else "magma", vmin=-1 if grey else None, vmax=1 if grey else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
        label = "malignant" if cv.labels[i] else "benign"
        axes[row, 0].set_ylabel(f"{label}\np={cv.mean_probability[i]:.2f}\nvar={cv.variance[i]:.3f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
