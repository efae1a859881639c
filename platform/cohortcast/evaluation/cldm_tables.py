"""CLDM's Tables 1-2 as objects, the paper's claims checked on them, and their Markdown.

Table 1 rows are `segmentation_metrics.SegmentationSummary`s (mean forecast with a patient
bootstrap CI, per-sample mean ± std over seeds); Table 2 rows hold each report metric on
all targets with its patient bootstrap CI. The claims are the issue's acceptance list,
each printed as holds / does not hold with the numbers behind it."""

from __future__ import annotations

from dataclasses import dataclass, field

from cohortcast.evaluation.metrics import Interval
from cohortcast.evaluation.segmentation_metrics import MetricDifference, SegmentationSummary
from cohortcast.evaluation.table import Claim

COPY_LAST = "Copy last mask"
NO_DIFFUSION = "No diffusion (regressor)"
CLDM_ALL = "CLDM (all priors)"
CLDM_ALL_ANCHORED = "CLDM (all priors), anchored"  # our addition: models/mask_anchoring.py
NO_DIFFUSION_ANCHORED = "No diffusion, anchored"
BOUND = "Current exam (upper bound)"
COPY_PRIOR = "Copy prior report"
CLDM_PRIOR = "CLDM + prior"
CLDM_NO_PRIOR = "CLDM without prior"
NO_DIFFUSION_PRIOR = "No diffusion + prior"
BOUND_PRIOR = "Current exam + prior (upper bound)"
REPORT_METRICS = ("bleu4", "rouge_l", "label_f1", "change_f1")
REPORT_HEADERS = ("BLEU-4", "ROUGE-L", "CheXpert F1 (micro)", "change F1 (macro)")


def cldm_k(k: int) -> str:
    return f"CLDM ({k} prior{'s' if k > 1 else ''})"


def _minus(text: str) -> str:
    return text.replace("-", "−")


def _ci(interval: Interval | None) -> str:
    return "" if interval is None else f" {_minus(str(interval))}"


def _num(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None or value != value else _minus(format(value, spec))


@dataclass
class Table1:
    rows: list[SegmentationSummary]
    difference: MetricDifference | None  # aVD CLDM(all) - copy-last, paired bootstrap
    ordering: dict[str, float]  # method -> mean-forecast aVD on the >= min-priors targets
    ordering_targets: int
    ordering_patients: int
    min_priors: int
    targets: int
    patients: int
    notes: dict[str, str] = field(default_factory=dict)
    anchored_difference: MetricDifference | None = None  # aVD CLDM(all), anchored - copy-last

    def row(self, method: str) -> SegmentationSummary | None:
        return next((r for r in self.rows if r.method == method), None)

    def markdown(self) -> str:
        lines = [
            "| Method | Dice (mean forecast) | aVD (mean forecast) | Dice per sample | aVD per sample "
            "| progression Dice | HD95 (mm) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            m, ci, s = r.mean_forecast, r.ci, r.per_seed
            prog = f"{_num(m['progression_dice'])} (n={r.n_defined['progression_dice']})"
            avd_seeds = _minus(f"{s['avd'].mean:.4f} ± {s['avd'].std:.4f}")
            lines.append(
                f"| {r.method} | {_num(m['dice'])}{_ci(ci['dice'])} | {_num(m['avd'], '.4f')}{_ci(ci['avd'])} "
                f"| {s['dice']} | {avd_seeds} | {prog} | {_num(m['hd95'], '.1f')} |"
            )
        lines.append("")
        for d in (self.difference, self.anchored_difference):
            if d is not None:
                lines.append(f"Paired aVD {d.a} − {d.b}: {_num(d.mean, '+.4f')} {_minus(str(d.interval))} (95% CI).")
        if self.ordering:
            parts = ", ".join(f"{m} {v:.4f}" for m, v in self.ordering.items())
            lines.append(
                f"aVD on the {self.ordering_targets} targets ({self.ordering_patients} patients) with "
                f">= {self.min_priors} priors: {parts}."
            )
        return "\n".join(lines)


@dataclass
class ReportRow:
    method: str
    uses_prior: bool
    values: dict[str, float | None]
    ci: dict[str, Interval | None]
    note: str = ""


@dataclass
class ReportDifference:
    a: str
    b: str
    metric: str
    mean: float
    interval: Interval | None


@dataclass
class Table2:
    rows: list[ReportRow]
    differences: list[ReportDifference]
    targets: int
    patients: int
    labeler: str
    uncertain: str

    def row(self, method: str) -> ReportRow | None:
        return next((r for r in self.rows if r.method == method), None)

    def markdown(self) -> str:
        lines = ["| Method | +Prior | " + " | ".join(REPORT_HEADERS) + " |", "|---|---|" + "---|" * 4]
        for r in self.rows:
            cells = [f"{_num(r.values[k])}{_ci(r.ci[k])}" for k in REPORT_METRICS]
            lines.append(f"| {r.method} | {'yes' if r.uses_prior else 'no'} | " + " | ".join(cells) + " |")
        for d in self.differences:
            lines.append("")
            lines.append(f"Paired {d.metric} {d.a} − {d.b}: {_num(d.mean, '+.3f')}{_ci(d.interval)} (95% CI).")
        return "\n".join(lines)


def segmentation_claims(t: Table1, dice_margin: float) -> list[Claim]:
    out = []
    cldm, copy, reg = t.row(CLDM_ALL), t.row(COPY_LAST), t.row(NO_DIFFUSION)
    if cldm is None or copy is None:
        return out
    a, c = cldm.mean_forecast["avd"], copy.mean_forecast["avd"]
    d = t.difference
    out.append(
        Claim(
            f"{CLDM_ALL} aVD < {COPY_LAST}, paired 95% CI excluding 0",
            d is not None and a < c and d.interval.high < 0,
            f"aVD {a:.4f} vs {c:.4f}"
            + ("" if d is None else f", difference {_num(d.mean, '+.4f')} {_minus(str(d.interval))}"),
        )
    )
    p = cldm.mean_forecast["progression_dice"]
    out.append(
        Claim(
            f"{CLDM_ALL} progression Dice > 0",
            p == p and p > 0,
            f"{_num(p)} on {cldm.n_defined['progression_dice']} targets with new disease on either side",
        )
    )
    da, dc = cldm.mean_forecast["dice"], copy.mean_forecast["dice"]
    out.append(
        Claim(
            f"{CLDM_ALL} Dice not below {COPY_LAST} by more than {dice_margin}",
            da >= dc - dice_margin,
            f"Dice {da:.3f} vs {dc:.3f}",
        )
    )
    if t.ordering:
        names = list(t.ordering)  # all, then the truncated rows from most to fewest priors
        values = [t.ordering[n] for n in names]
        holds = t.ordering_targets > 0 and all(x <= y for x, y in zip(values, values[1:]))
        out.append(
            Claim(
                f"aVD ordered {' <= '.join(names)} on targets with >= {t.min_priors} priors",
                holds,
                f"{t.ordering_targets} targets: " + ", ".join(f"{v:.4f}" for v in values),
            )
        )
    if reg is not None:
        r = reg.mean_forecast["avd"]
        out.append(Claim(f"{CLDM_ALL} aVD < {NO_DIFFUSION}", a < r, f"aVD {a:.4f} vs {r:.4f}"))
    anchored, d = t.row(CLDM_ALL_ANCHORED), t.anchored_difference
    if anchored is not None and d is not None:
        x = anchored.mean_forecast["avd"]
        out.append(
            Claim(
                f"(our addition) {CLDM_ALL_ANCHORED} aVD < {COPY_LAST}, paired 95% CI excluding 0",
                x < c and d.interval.high < 0,
                f"aVD {x:.4f} vs {c:.4f}, difference {_num(d.mean, '+.4f')} {_minus(str(d.interval))}",
            )
        )
    return out


def report_claims(t: Table2) -> list[Claim]:
    out = []
    w, wo = t.row(CLDM_PRIOR), t.row(CLDM_NO_PRIOR)
    if w is None or wo is None:
        return out
    for metric, label in (("change_f1", "change-label F1"), ("bleu4", "BLEU-4")):
        a, b = w.values[metric], wo.values[metric]
        d = next((x for x in t.differences if x.metric == metric), None)
        detail = f"{_num(a)} vs {_num(b)}"
        if d is not None and d.interval is not None:
            detail += f", paired difference {_num(d.mean, '+.3f')} {_minus(str(d.interval))}"
        holds = a is not None and b is not None and a > b
        out.append(Claim(f"{CLDM_PRIOR} beats {CLDM_NO_PRIOR} on {label}", holds, detail))
    return out


def format_claims(claims: list[Claim]) -> list[str]:
    return [f"- **{'holds' if c.holds else 'does not hold'}**: {c.text} ({c.detail})" for c in claims]
