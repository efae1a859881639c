"""NAMD Table 1: per method, AUROC/AUPRC of the evaluator on its images (mean ± std over
the N sampling seeds), LPIPS and a Frechet distance against the real follow-ups.

A method is a list of image sets, one per seed (real images: one set, std 0). Sample k
of every case forms seed run k, as the paper's N independent runs do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cohortcast.evaluation.metrics import MeanStd, classification_metrics, frechet_distance_of_features, over_seeds

Probabilities = Callable[[np.ndarray], np.ndarray]  # (n, H, W) -> (n,)
Features = Callable[[np.ndarray], np.ndarray]  # (n, H, W) -> (n, d)
Distances = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (n, H, W) x 2 -> (n,)


@dataclass
class Method:
    name: str
    runs: list[np.ndarray]  # one (n, H, W) image set per seed
    generated: bool  # image metrics against the real follow-ups are computed for generated sets
    note: str = ""


@dataclass
class Row:
    method: str
    auroc: MeanStd
    auprc: MeanStd
    lpips: MeanStd | None
    frechet: MeanStd | None
    probabilities: np.ndarray  # (runs, n)
    note: str = ""


@dataclass
class Table1:
    rows: list[Row]
    frechet_space: str
    lpips: str  # what LPIPS used, or why it is n/a
    n_cases: int
    n_malignant: int
    notes: list[str] = field(default_factory=list)

    def row(self, method: str) -> Row:
        return next(r for r in self.rows if r.method == method)

    def markdown(self) -> str:
        head = f"| Method | LPIPS ↓ | Fréchet distance ↓ ({self.frechet_space}) | AUROC ↑ | AUPRC ↑ |"
        lines = [head, "|---|---|---|---|---|"]
        for r in self.rows:
            cells = [str(r.lpips) if r.lpips else "–", str(r.frechet) if r.frechet else "–", str(r.auroc),
                     str(r.auprc)]
            lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _summary(values: list[float]) -> MeanStd:
    return MeanStd(float(np.mean(values)), float(np.std(values)), len(values))


def compute_table(methods: list[Method], labels: np.ndarray, follow_ups: np.ndarray, probabilities: Probabilities,
                  features: Features, frechet_space: str, lpips: Distances | None, lpips_label: str) -> Table1:
    labels = np.asarray(labels, int)
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
                fd = _summary([frechet_distance_of_features(real_features, features(images), frechet_space).value
                               for images in method.runs])
        rows.append(Row(method.name, per_seed["auroc"], per_seed["auprc"], lp, fd, probs, method.note))
    return Table1(rows, frechet_space, lpips_label, len(labels), int(labels.sum()))


@dataclass
class Claim:
    text: str
    holds: bool
    detail: str


def paper_claims(table: Table1, namd: str, ablation: str | None, baseline: str, follow_up: str) -> list[Claim]:
    """NAMD's scientific claims on AUROC means: real baseline < NAMD <= real follow-up,
    and the ablation below full NAMD."""
    b, n, f = (table.row(m).auroc for m in (baseline, namd, follow_up))
    claims = [Claim(f"{baseline} < {namd}", b.mean < n.mean, f"{b.mean:.3f} vs {n.mean:.3f}"),
              Claim(f"{namd} <= {follow_up}", n.mean <= f.mean, f"{n.mean:.3f} vs {f.mean:.3f}")]
    if ablation:
        a = table.row(ablation).auroc
        claims.append(Claim(f"{ablation} < {namd}", a.mean < n.mean, f"{a.mean:.3f} vs {n.mean:.3f}"))
    return claims
