"""The CLDM cohort's fibrosis model ("trend"): the fibrotic fraction of the lung at each
exam, and the Bayes oracle that forecasts it from priors under the generator's own prior.

A patient with fibrosis has a baseline extent b ~ U(baseline_range) and a trend r (fraction
of lung per year): r = 0 for a stable group (probability `stable_fraction`), else
r ~ U(rate_range). The fraction seen at an exam t years after the first is
f(t) = b + r t + e, e ~ N(0, noise_sd) independently per exam (inspiration level, reader
and segmentation variability), clipped to [0, MAX_FRACTION] (the ranges keep clipping
from binding in practice). With noise, two priors no longer give the trend exactly, so
more priors carry more information: the oracle's error falls with the number it sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_FRACTION = 0.9


@dataclass(frozen=True)
class FibrosisPrior:
    stable_fraction: float
    baseline_range: tuple[float, float]
    rate_range: tuple[float, float]  # fraction of lung per year, progressors
    noise_sd: float

    @classmethod
    def from_config(cls, cfg) -> FibrosisPrior:
        return cls(
            cfg.fibrosis_stable_fraction, cfg.fibrosis_baseline_range, cfg.fibrosis_rate_range, cfg.fibrosis_noise_sd
        )


@dataclass(frozen=True)
class FibrosisTrend:
    baseline: float
    rate: float  # 0 = stable

    def observe(self, prior: FibrosisPrior, years: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The fraction seen at each exam (`years` since the first)."""
        noise = rng.normal(0.0, prior.noise_sd, size=len(years))
        return np.clip(self.baseline + self.rate * np.asarray(years, float) + noise, 0.0, MAX_FRACTION)


def draw_trend(prior: FibrosisPrior, rng: np.random.Generator) -> FibrosisTrend:
    # Three draws always, so a patient's stream does not depend on which group it is in.
    stable = rng.random() < prior.stable_fraction
    baseline = float(rng.uniform(*prior.baseline_range))
    rate = float(rng.uniform(*prior.rate_range))
    return FibrosisTrend(baseline, 0.0 if stable else rate)


class TrendOracle:
    """Bayes posterior mean of f(t_target) - its noise-free part b + r t_target - given
    (years, fractions) of the priors it sees, under the known prior: a grid over (b, r)
    with the stable group as a point mass at r = 0. With one prior it leans on the
    population trend; every further prior narrows the posterior."""

    def __init__(self, prior: FibrosisPrior, baseline_points: int = 161, rate_points: int = 81):
        lo, hi = prior.baseline_range
        self.b = lo + (np.arange(baseline_points) + 0.5) * (hi - lo) / baseline_points
        rlo, rhi = prior.rate_range
        rates = rlo + (np.arange(rate_points) + 0.5) * (rhi - rlo) / rate_points
        self.r = np.concatenate([[0.0], rates])
        weights = np.concatenate(
            [[prior.stable_fraction], np.full(rate_points, (1 - prior.stable_fraction) / rate_points)]
        )
        with np.errstate(divide="ignore"):
            self.log_prior = np.log(weights)
        self.sd = max(prior.noise_sd, 1e-4)

    def forecast(self, years: np.ndarray, fractions: np.ndarray, target_years: float) -> float:
        years, fractions = np.asarray(years, float), np.asarray(fractions, float)
        mean = self.b[:, None, None] + self.r[None, :, None] * years[None, None, :]  # (B, R, K)
        loglik = -0.5 * (((fractions - mean) / self.sd) ** 2).sum(-1) + self.log_prior[None, :]
        w = np.exp(loglik - loglik.max())
        w /= w.sum()
        return float((w * (self.b[:, None] + self.r[None, :] * target_years)).sum())
