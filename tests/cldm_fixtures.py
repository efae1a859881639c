"""A tiny ingested cohort in the CLDM studies schema (issue 15 interface, section 2),
written directly with pyarrow (no manifest, no Ray): CT rows with a `volume`, DX rows
with a `radiograph`, hive-partitioned by split, and a card.json with a fingerprint.
Images are smooth random blobs in [-1, 1], so masked patches are predictable from
their neighbours and a masked-image-modelling loss can fall in a few steps."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _tensor_column(arrays: list[np.ndarray]):
    """Ray Data's tensor extension type, what ingestion's write_parquet produces: Ray
    Data reads it back as (B, ...) arrays. Importing it does not start Ray."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.stack(arrays))


def smooth_image(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian blobs: low-frequency structure, values in [-1, 1]."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    image = np.zeros(shape, np.float32)
    for _ in range(3):
        centre = rng.uniform(-0.6, 0.6, len(shape))
        width = rng.uniform(0.2, 0.5)
        image += np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * width**2)).astype(np.float32)
    return (image / image.max() * 2 - 1).astype(np.float32)


def write_ingested_studies(
    root: str | Path,
    volume_shape: tuple[int, int, int] = (8, 16, 16),
    radiograph_size: int = 16,
    patients: dict[str, int] | None = None,
    exams: int = 2,
    kinds: tuple[int, ...] = (3, 2),
    seed: int = 0,
    fingerprint: str | None = None,
) -> dict:
    """Writes `<root>/studies/split=*/part-0.parquet` and `<root>/card.json`; returns the
    card. `patients`: per split (default train 3, val 1); each patient has `exams` dates,
    one CT (dims 3) and one DX (dims 2) study per date (only the `kinds` asked for)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    patients = patients or {"train": 3, "val": 1}
    zeros_volume = np.zeros(volume_shape, np.float32)
    zeros_radiograph = np.zeros((radiograph_size, radiograph_size), np.float32)
    counts = {}
    for split, count in patients.items():
        rows = []
        for p in range(count):
            patient = hashlib.sha256(f"{split}-{p}".encode()).hexdigest()[:16]
            for exam in range(exams):
                date = datetime.date(2020, 1, 1) + datetime.timedelta(days=200 * exam)
                for dims in kinds:
                    ct = dims == 3
                    rows.append(
                        {
                            "patient": patient,
                            "study": hashlib.sha256(f"{patient}-{exam}-{dims}".encode()).hexdigest()[:16],
                            "study_date": date.isoformat(),
                            "days_since_baseline": 200 * exam,
                            "exam_index": exam,
                            "num_exams": exams,
                            "modality": "CT" if ct else "DX",
                            "dims": dims,
                            "report_text": "" if ct else "FINDINGS: No acute process.\nIMPRESSION: No Finding.",
                            "has_mask": ct,
                            "has_lung_mask": ct,
                            "lung_voxels": int(np.prod(volume_shape) // 3) if ct else 0,
                            "lung_volume_ml": 4000.0 if ct else 0.0,
                            "mask_volume_ml": 120.0 * exam if ct else 0.0,
                            "volume": smooth_image(rng, volume_shape) if ct else zeros_volume,
                            "radiograph": zeros_radiograph if ct else smooth_image(rng, zeros_radiograph.shape),
                            "radiograph_affine": np.eye(4).ravel() if not ct else np.zeros(16),
                            "volume_affine": np.eye(4).ravel(),
                        }
                    )
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        arrays = {
            k: _tensor_column(v) if k in ("volume", "radiograph", "radiograph_affine", "volume_affine") else v
            for k, v in columns.items()
        }
        table = pa.table(arrays).set_column(list(columns).index("dims"), "dims", pa.array(columns["dims"], pa.int8()))
        folder = root / "studies" / f"split={split}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / "part-0.parquet")
        counts[split] = len(rows)
    card = {
        "fingerprint": fingerprint or hashlib.sha256(f"{seed}-{volume_shape}-{kinds}".encode()).hexdigest(),
        "config": {"output": str(root), "normalise": "minus_one_one", "volume_shape": list(volume_shape)},
        "counts": {"study_rows": counts},
        "tables": {"studies": {"volume": list(volume_shape), "radiograph": [radiograph_size, radiograph_size]}},
    }
    (root / "card.json").write_text(json.dumps(card, indent=2))
    return card
