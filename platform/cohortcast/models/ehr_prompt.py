"""EHR row -> radiology-report-style prompt (NAMD Fig. 1 / App. C).

Deterministic: the same row always gives the same text. Missing values are said to be
missing ("not recorded") rather than silently dropped or imputed, so the LLM sees the
difference between "no family history" and "unknown".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_MISSING = "not recorded"
_RELATIVES = (
    ("famfather", "father"),
    ("fammother", "mother"),
    ("fambrother", "brother"),
    ("famsister", "sister"),
    ("famchild", "child"),
)
_ATTENUATION = {"Soft Tissue": "solid", "Ground Glass": "ground-glass", "Part Solid": "part-solid"}


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value).strip() != ""


def _yes_no(value: Any) -> str:
    if not _present(value):
        return _MISSING
    return {"yes": "yes", "no": "no"}.get(str(value).strip().lower(), _MISSING)


def _mm(value: Any) -> str:
    return f"{float(value):.1f} mm" if _present(value) else f"size {_MISSING}"


def render_ehr_prompt(ehr: Mapping[str, Any]) -> str:
    """The 13 NAMD EHR features (manifest names) -> a short report paragraph."""
    age = f"{float(ehr['age']):.0f}-year-old" if _present(ehr.get("age")) else f"age {_MISSING},"
    gender = str(ehr["gender"]).lower() if _present(ehr.get("gender")) else f"sex {_MISSING}"
    family = [name for key, name in _RELATIVES if _yes_no(ehr.get(key)) == "yes"]
    unknown_family = [name for key, name in _RELATIVES if _yes_no(ehr.get(key)) == _MISSING]
    if family:
        family_text = "lung cancer in " + ", ".join(family)
    elif len(unknown_family) == len(_RELATIVES):
        family_text = _MISSING
    else:
        family_text = "none reported"
    if unknown_family and family_text != _MISSING:
        family_text += f" ({', '.join(unknown_family)} {_MISSING})"
    attenuation = _attenuation_text(ehr.get("SCT_PRE_ATT"))
    margins = str(ehr["SCT_MARGINS"]).lower() if _present(ehr.get("SCT_MARGINS")) else _MISSING
    location = str(ehr["SCT_EPI_LOC"]).lower() if _present(ehr.get("SCT_EPI_LOC")) else f"location {_MISSING}"
    return (
        f"CLINICAL HISTORY: {age} {gender}. Emphysema: {_yes_no(ehr.get('diagemph'))}. "
        f"Family history: {family_text}.\n"
        f"FINDINGS: {attenuation} nodule in the {location}, long axis {_mm(ehr.get('SCT_LONG_DIA'))}, "
        f"perpendicular axis {_mm(ehr.get('SCT_PERP_DIA'))}, margins {margins}."
    )


def _attenuation_text(value: Any) -> str:
    if not _present(value):
        return f"Attenuation {_MISSING};"
    return _ATTENUATION.get(str(value), str(value).lower()).capitalize()
