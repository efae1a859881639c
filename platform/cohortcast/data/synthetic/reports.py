"""Templated radiology reports: findings and change versus the prior exam (the CLDM
report-generation target). Deterministic given the states."""

from __future__ import annotations

import datetime as dt

from cohortcast.data.synthetic.clinical import NoduleState

_ATT_WORDS = {"Soft Tissue": "solid", "Ground Glass": "ground-glass", "Part Solid": "part-solid"}
_MARGIN_WORDS = {"Smooth": "smooth", "Poorly Defined": "poorly defined", "Spiculated": "spiculated"}


def _change(prev: NoduleState, cur: NoduleState) -> str:
    delta = cur.long_mm - prev.long_mm
    if delta >= 1.5:
        trend = f"has increased in size (previously {prev.long_mm:.0f} mm)"
    elif delta <= -1.5:
        trend = f"has decreased in size (previously {prev.long_mm:.0f} mm)"
    else:
        trend = "is stable in size"
    extra = []
    if cur.attenuation != prev.attenuation:
        extra.append(f"now {_ATT_WORDS[cur.attenuation]} (previously {_ATT_WORDS[prev.attenuation]})")
    if cur.margins != prev.margins:
        extra.append(f"margins now {_MARGIN_WORDS[cur.margins]}")
    return trend + ("; " + "; ".join(extra) if extra else "")


def write_report(
    date: dt.date,
    prior_date: dt.date | None,
    nodules: list[tuple[str, str, NoduleState, NoduleState | None]],
    fibrosis_now: float,
    fibrosis_prior: float | None,
) -> str:
    """`nodules`: (nodule_id, lobe, current state, prior state or None)."""
    lines = [
        f"EXAM: Low-dose CT chest, {date.isoformat()}.",
        f"COMPARISON: {prior_date.isoformat() if prior_date else 'None'}.",
        "FINDINGS:",
    ]
    for nodule_id, lobe, cur, prev in nodules:
        text = (
            f"Nodule {nodule_id}: {cur.long_mm:.0f} x {cur.perp_mm:.0f} mm {_ATT_WORDS[cur.attenuation]} "
            f"nodule with {_MARGIN_WORDS[cur.margins]} margins in the {lobe.lower()}"
        )
        lines.append(text + (f", which {_change(prev, cur)}." if prev else "."))
    if fibrosis_now > 0.01:
        fib = f"Subpleural basal reticulation involving {100 * fibrosis_now:.0f}% of lung volume"
        if fibrosis_prior is not None:
            delta = fibrosis_now - fibrosis_prior
            # The linear model only grows; the trend model's per-exam noise can also shrink it.
            if delta > 0.005:
                fib += ", progressed since prior"
            else:
                fib += ", regressed since prior" if delta < -0.005 else ", unchanged from prior"
        lines.append(fib + ".")
    else:
        lines.append("No fibrotic lung disease.")
    growing = [n for n, _, cur, prev in nodules if prev and cur.long_mm - prev.long_mm >= 1.5]
    suspicious = [n for n, _, cur, _ in nodules if cur.margins == "Spiculated" or cur.long_mm >= 15]
    if growing or suspicious:
        impression = f"Suspicious nodule(s) {', '.join(sorted(set(growing + suspicious)))}; tissue sampling advised."
    else:
        impression = "Indeterminate nodule(s), follow-up CT advised."
    lines.append(f"IMPRESSION: {impression}")
    return "\n".join(lines)
