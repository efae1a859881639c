"""NAMD Table 1: per method, AUROC/AUPRC of the evaluator on its images (mean ± std over
the N sampling seeds), LPIPS and a Frechet distance against the real follow-ups.

A method is a list of image sets, one per seed (real images: one set, std 0). Sample k
of every case forms seed run k, as the paper's N independent runs do. Optionally: a
patient-level bootstrap CI of each row's AUROC, paired AUROC differences between rows,
and the error of each method's mean forecast (whole crop, nodule region, latent)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cohortcast.evaluation.metrics import (
    Interval,
    MeanStd,
    classification_metrics,
    frechet_distance_of_features,
    mean_auroc,
    over_seeds,
    paired_bootstrap,
    patient_bootstrap,
)

Probabilities = Callable[[np.ndarray], np.ndarray]  # (n, H, W) -> (n,)
Features = Callable[[np.ndarray], np.ndarray]  # (n, H, W) -> (n, d)
Distances = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (n, H, W) x 2 -> (n,)


@dataclass
class Method:
    name: str
    runs: list[np.ndarray]  # one (n, H, W) image set per seed
    generated: bool  # image metrics against the real follow-ups are computed for generated sets
    note: str = ""
    # The method's single per-case forecast, for the forecast-error columns: the mean over
    # samples for generated methods, the baseline itself for copy-the-baseline.
    mean_image: np.ndarray | None = None  # (n, H, W)
    latent: np.ndarray | None = None  # (n, c, h, w) per-case mean latent


@dataclass
class Row:
    method: str
    auroc: MeanStd
    auprc: MeanStd
    lpips: MeanStd | None
    frechet: MeanStd | None
    probabilities: np.ndarray  # (runs, n)
    note: str = ""
    auroc_ci: Interval | None = None  # patient bootstrap of the mean-over-runs AUROC
    mae: float | None = None  # mean |mean_image - follow-up| over the whole crop
    region_mae: float | None = None  # the same inside the nodule region mask
    latent_error: float | None = None  # mean |latent - target latent|


@dataclass(frozen=True)
class PairedDifference:
    """Mean-over-runs AUROC of a minus that of b, with a CI from the same patient resamples
    for both, so the case mix shared by a and b cancels out of the interval."""

    a: str
    b: str
    mean: float
    interval: Interval


@dataclass
class Table1:
    rows: list[Row]
    frechet_space: str
    lpips: str  # what LPIPS used, or why it is n/a
    n_cases: int
    n_malignant: int
    notes: list[str] = field(default_factory=list)
    differences: list[PairedDifference] = field(default_factory=list)
    n_boot: int = 0  # resamples requested per bootstrap; 0 when no patients were given

    def row(self, method: str) -> Row:
        return next(r for r in self.rows if r.method == method)

    def markdown(self) -> str:
        head = (
            f"| Method | AUROC ↑ [95% CI] | AUPRC ↑ | MAE ↓ | nodule MAE ↓ | latent error ↓ | LPIPS ↓ "
            f"| Fréchet distance ↓ ({self.frechet_space}) |"
        )
        lines = [head, "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            auroc = str(r.auroc) + (f" [{r.auroc_ci.low:.2f}, {r.auroc_ci.high:.2f}]" if r.auroc_ci else "")
            cells = [
                auroc,
                str(r.auprc),
                *(_cell(v, ".4f") for v in (r.mae, r.region_mae, r.latent_error)),
                str(r.lpips) if r.lpips else "–",
                str(r.frechet) if r.frechet else "–",
            ]
            lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
        if self.differences:
            lines.append("")
        for d in self.differences:
            used = d.interval.n_boot_used
            resamples = f"{used} resamples" if used == self.n_boot else f"{used} of {self.n_boot} resamples usable"
            lines.append(
                f"AUROC difference {d.a} − {d.b}: {_minus(f'{d.mean:+.3f}')} "
                f"[{_minus(f'{d.interval.low:.3f}')}, {_minus(f'{d.interval.high:.3f}')}] "
                f"(patient bootstrap, {resamples})"
            )
        return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _minus(text: str) -> str:
    return text.replace("-", "−")  # typographic minus, matching the "−" between method names


def _summary(values: list[float]) -> MeanStd:
    return MeanStd(float(np.mean(values)), float(np.std(values)), len(values))


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}; expected {shape}")
    return array


def _mae(prediction: np.ndarray, target: np.ndarray) -> float:
    """Mean over cases of each case's mean absolute error (cases weigh equally)."""
    errors = np.abs(np.asarray(prediction, np.float64) - np.asarray(target, np.float64))
    return float(errors.reshape(len(errors), -1).mean(1).mean())


def _region_mae(prediction: np.ndarray, target: np.ndarray, masks: np.ndarray) -> float | None:
    """Mean over cases of the MAE inside each case's mask; cases with an empty mask have no
    nodule region to score and are skipped (None if none is left)."""
    errors = np.abs(np.asarray(prediction, np.float64) - np.asarray(target, np.float64))
    per_case = [float(e[m].mean()) for e, m in zip(errors, masks) if m.any()]
    return float(np.mean(per_case)) if per_case else None


def _forecast_errors(
    method: Method, follow_ups: np.ndarray, region_masks: np.ndarray | None, target_latents: np.ndarray | None
) -> dict[str, float | None]:
    errors = {"mae": None, "region_mae": None, "latent_error": None}
    if method.mean_image is not None:
        mean_image = _check_shape(f"{method.name} mean_image", method.mean_image, follow_ups.shape)
        errors["mae"] = _mae(mean_image, follow_ups)
        if region_masks is not None:
            errors["region_mae"] = _region_mae(mean_image, follow_ups, region_masks)
    if method.latent is not None and target_latents is not None:
        errors["latent_error"] = _mae(
            _check_shape(f"{method.name} latent", method.latent, target_latents.shape), target_latents
        )
    return errors


def _bootstrap_rows(
    rows: list[Row],
    differences: Sequence[tuple[str, str]],
    labels: np.ndarray,
    patients: Sequence[str],
    n_boot: int,
    seed: int,
) -> list[PairedDifference]:
    """Sets each row's auroc_ci and returns the paired differences. One seed for all, so
    every row and difference sees the identical sequence of patient resamples."""
    by_name = {r.method: r for r in rows}

    def auroc_of(method: str) -> Callable[[np.ndarray], float]:
        probs = by_name[method].probabilities  # (runs, n)
        return lambda idx: mean_auroc(labels[idx], probs[:, idx])

    for r in rows:
        r.auroc_ci = patient_bootstrap(patients, auroc_of(r.method), n_boot, seed)
    out = []
    for a, b in differences:
        interval = paired_bootstrap(patients, auroc_of(a), auroc_of(b), n_boot, seed)
        out.append(PairedDifference(a, b, by_name[a].auroc.mean - by_name[b].auroc.mean, interval))
    return out


def compute_table(
    methods: list[Method],
    labels: np.ndarray,
    follow_ups: np.ndarray,
    probabilities: Probabilities,
    features: Features,
    frechet_space: str,
    lpips: Distances | None,
    lpips_label: str,
    *,
    patients: Sequence[str] | None = None,
    target_latents: np.ndarray | None = None,
    region_masks: np.ndarray | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    differences: Sequence[tuple[str, str]] = (),
) -> Table1:
    """patients (one id per case) switch on the patient-bootstrap AUROC CIs and the paired
    differences (method_a, method_b); target_latents and region_masks switch on the latent
    and nodule-region errors of methods that carry latent / mean_image."""
    labels = np.asarray(labels, int)
    follow_ups = np.asarray(follow_ups)
    n = len(labels)
    if patients is not None:
        patients = _check_shape("patients", np.asarray(patients), (n,))
    if region_masks is not None:
        region_masks = _check_shape("region_masks", np.asarray(region_masks, bool), follow_ups.shape)
    if target_latents is not None:
        target_latents = np.asarray(target_latents)
        if len(target_latents) != n:
            raise ValueError(f"{len(target_latents)} target latents for {n} cases")
    names = {m.name for m in methods}
    for a, b in differences:
        if a not in names or b not in names:
            raise ValueError(f"difference {a!r} - {b!r} names a method not in the table ({sorted(names)})")
    if differences and patients is None:
        raise ValueError("paired AUROC differences need patients (one id per case) for the bootstrap")
    real_features = features(follow_ups)
    rows = []
    for method in methods:
        probs = np.stack([probabilities(images) for images in method.runs])  # (runs, n)
        per_seed = over_seeds([classification_metrics(labels, p) for p in probs])
        lp = fd = None
        if method.generated:
            if lpips is not None:
                lp = _summary([float(np.mean(lpips(images, follow_ups))) for images in method.runs])
            if len(follow_ups) >= 2:
                fd = _summary(
                    [
                        frechet_distance_of_features(real_features, features(images), frechet_space).value
                        for images in method.runs
                    ]
                )
        rows.append(
            Row(
                method.name,
                per_seed["auroc"],
                per_seed["auprc"],
                lp,
                fd,
                probs,
                method.note,
                **_forecast_errors(method, follow_ups, region_masks, target_latents),
            )
        )
    table = Table1(rows, frechet_space, lpips_label, n, int(labels.sum()))
    if patients is not None:
        table.differences = _bootstrap_rows(rows, differences, labels, patients, n_boot, boot_seed)
        table.n_boot = n_boot
    return table


@dataclass
class Claim:
    text: str
    holds: bool
    detail: str


def paper_claims(table: Table1, namd: str, ablation: str | None, baseline: str, follow_up: str) -> list[Claim]:
    """NAMD's scientific claims on AUROC means: real baseline < NAMD <= real follow-up,
    and the ablation below full NAMD."""
    b, n, f = (table.row(m).auroc for m in (baseline, namd, follow_up))
    claims = [
        Claim(f"{baseline} < {namd}", b.mean < n.mean, f"AUROC {b.mean:.3f} vs {n.mean:.3f}"),
        Claim(f"{namd} <= {follow_up}", n.mean <= f.mean, f"AUROC {n.mean:.3f} vs {f.mean:.3f}"),
    ]
    if ablation:
        a = table.row(ablation).auroc
        claims.append(Claim(f"{ablation} < {namd}", a.mean < n.mean, f"AUROC {a.mean:.3f} vs {n.mean:.3f}"))
    return claims


def error_claims(table: Table1, forecast: str, references: Sequence[str]) -> list[Claim]:
    """The forecast's mean-forecast MAE and latent error below each reference's; a
    reference missing from the table, or lacking a value, gives no claim for it."""
    f = table.row(forecast)
    present = {r.method: r for r in table.rows}
    claims = []
    for name in references:
        ref = present.get(name)
        if ref is None:
            continue
        for attr, label in (("mae", "mean-forecast MAE"), ("latent_error", "latent error")):
            mine, theirs = getattr(f, attr), getattr(ref, attr)
            if mine is not None and theirs is not None:
                claims.append(Claim(f"{forecast} {label} < {name}", mine < theirs, f"{mine:.4f} vs {theirs:.4f}"))
    return claims


def difference_claims(table: Table1) -> list[Claim]:
    """Each paired AUROC difference a − b is claimed positive: its CI lies above 0."""
    return [
        Claim(
            f"{d.a} − {d.b} AUROC CI excludes 0",
            d.interval.low > 0,
            f"AUROC difference {_minus(f'{d.mean:+.3f}')} {_minus(str(d.interval))}",
        )
        for d in table.differences
    ]
