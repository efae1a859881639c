"""`cohortcast ingest`: manifest -> sharded Parquet with tensor columns, on Ray Data.

Output folder (written under a temp name, renamed when complete):

    nodules/split=*/...parquet   one row per (study, nodule): ids, dates, the 13 EHR
                                 features, label, `crop` (H, W), `crop_affine` (its
                                 grid: (column, row, 0, 1) -> LPS mm, flattened 4x4),
                                 `patch` (P, P, P)
    studies/split=*/...parquet   one row per study, CT and radiograph alike (`dims` 3 or
                                 2): `volume` (Z, Y, X) with `mask` and `lung_mask`, or
                                 `radiograph` (R, R) with `radiograph_affine`; lung and
                                 lesion volumes, report text, source and resampled geometry
    quarantine.parquet           every study or finding that could not be used, and why
    card.json                    rows, shapes, manifest hash, config, counts

`split=train|val|test` is hive partitioning: `ray.data.read_parquet(".../nodules")`
and `pyarrow.parquet.read_table` restore the `split` column from the folder name.

Subjects and studies are keyed by keyed-hash pseudonyms; no DICOM header value is read
into any output. A rerun with the same manifest and config finds the card and does
nothing; a changed manifest or config rebuilds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cohortcast import __version__
from cohortcast.config import IngestConfig, PrivacyConfig, RayConfig, to_dict
from cohortcast.console import format_duration, format_rate
from cohortcast.data.manifest import EHR_FEATURES, NODULE_EHR, PATIENT_EHR, Manifest, load_manifest
from cohortcast.data.privacy import Pseudonymizer
from cohortcast.data.split import SPLITS, assign_split
from cohortcast.data.study_processing import OK, QUARANTINED, process_study
from cohortcast.io.atomic import atomic_folder, clear_stale_temps, write_text_atomic

log = logging.getLogger(__name__)

CARD = "card.json"
QUARANTINE_SCHEMA = pa.schema(
    [
        ("patient", pa.string()),
        ("study", pa.string()),
        ("nodule_id", pa.string()),
        ("path", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)
# Config fields that do not change what is written.
_BLOCKS_PER_CPU = 4
_NON_CONTENT_FIELDS = {"manifest", "output", "overwrite", "num_cpus_per_task", "rows_per_file"}


def _clean(value: Any) -> Any:
    return None if value is None or value != value else value  # NaN -> None


# Modalities whose studies are single-plane images (the reader decides in the end: a
# one-slice CT is read as 2D too).
_PLANAR_MODALITIES = {"CR", "DX"}


def listed_dims(modality: str) -> int:
    return 2 if modality in _PLANAR_MODALITIES else 3


def _exam_numbers(studies) -> tuple[list[int], dict[int, int]]:
    """Per study (in date order) its index among the patient's studies of the same
    dims, and the count per dims: a CT series and a radiograph are separate sequences
    (a CT + DX exam pair share their exam_index)."""
    dims = [listed_dims(m) for m in studies["modality"]]
    seen: Counter = Counter()
    index = []
    for d in dims:
        index.append(seen[d])
        seen[d] += 1
    return index, dict(seen)


def _optional_path(manifest: Manifest, study: dict, key: str) -> dict[str, str]:
    value = study.get(key) or ""
    return {key: str(manifest.resolve(value)) if value else "", f"{key}_rel": value}


def build_tasks(manifest: Manifest, pseudo: Pseudonymizer, cfg: IngestConfig) -> list[dict[str, Any]]:
    """One JSON-friendly task per study, already pseudonymised: the only thing that
    leaves the driver for the workers (besides file paths)."""
    patients = manifest.patients.set_index("patient_id")
    labels = {
        (p, n): int(m) for p, n, m in manifest.labels[["patient_id", "nodule_id", "malignant"]].itertuples(index=False)
    }
    findings_by_study: dict[str, list[dict]] = {}
    for row in manifest.findings.to_dict("records"):
        findings_by_study.setdefault(row["study_id"], []).append(row)
    tasks = []
    for patient_id, studies in manifest.studies.sort_values(["patient_id", "study_date"]).groupby(
        "patient_id", sort=True
    ):
        subject = pseudo(patient_id)
        split = assign_split(subject, cfg.split)
        ehr_patient = {k: _clean(patients.loc[patient_id, k]) for k in PATIENT_EHR}
        baseline = studies["study_date"].iloc[0]
        exam_index, num_exams = _exam_numbers(studies)
        for k, study in enumerate(studies.to_dict("records")):
            dims = listed_dims(study["modality"])
            findings = []
            for f in findings_by_study.get(study["study_id"], []):
                findings.append(
                    {
                        "nodule_id": str(f["nodule_id"]),
                        "malignant": labels.get((patient_id, f["nodule_id"]), -1),
                        "center_x_mm": f["center_x_mm"],
                        "center_y_mm": f["center_y_mm"],
                        "center_z_mm": f["center_z_mm"],
                        **{k: _clean(f[k]) for k in NODULE_EHR},
                        **ehr_patient,
                    }
                )
            tasks.append(
                {
                    "patient": subject,
                    "study": pseudo(study["study_id"], kind="study"),
                    "split": split,
                    "study_date": study["study_date"].isoformat(),
                    "exam_index": exam_index[k],
                    "num_exams": num_exams[dims],
                    "days_since_baseline": (study["study_date"] - baseline).days,  # the patient's first study
                    "modality": study["modality"],
                    "dims": dims,
                    "path": str(manifest.resolve(study["path"])),
                    "rel_path": study["path"],
                    **_optional_path(manifest, study, "mask_path"),
                    **_optional_path(manifest, study, "lung_mask_path"),
                    "report_text": study.get("report_text") or "",
                    "findings_json": json.dumps(findings),
                }
            )
    return tasks


def content_fingerprint(manifest: Manifest, cfg: IngestConfig, pseudo: Pseudonymizer) -> str:
    """What the output depends on: manifest tables, content-relevant config, and the
    pseudonym secret (via a pseudonym of a constant, which reveals nothing)."""
    content = {k: v for k, v in to_dict(cfg).items() if k not in _NON_CONTENT_FIELDS}
    blob = json.dumps([manifest.fingerprint(), content, pseudo("__fingerprint__"), __version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def require_finite_row(row: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    """The Parquet write boundary: a tensor holding NaN/Inf is never written.
    process_study quarantines such studies first, so this raising means a bug, and
    the run fails before its output folder is renamed into place."""
    for name in columns:
        if not np.isfinite(np.asarray(row[name])).all():
            raise ValueError(f"refusing to write non-finite values in column {name!r} of study {row['study']}")
    return row


def explode_nodules(result: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Study result -> one row per usable finding (the NAMD training rows)."""
    if result["status"] != OK:
        return
    usable = [f for f in json.loads(result["findings_json"]) if f["status"] == OK]
    for f, crop, crop_affine, patch in zip(usable, result["crops"], result["crop_affines"], result["patches"]):
        row = {
            "patient": result["patient"],
            "study": result["study"],
            "split": result["split"],
            "nodule_id": f["nodule_id"],
            "study_date": result["study_date"],
            "days_since_baseline": int(result["days_since_baseline"]),
            "exam_index": int(result["exam_index"]),
            "num_exams": int(result["num_exams"]),
            "modality": result["modality"],
            "malignant": int(f["malignant"]),
            **{k: f[k] for k in EHR_FEATURES},
            "center_x_mm": f["center_x_mm"],
            "center_y_mm": f["center_y_mm"],
            "center_z_mm": f["center_z_mm"],
            "crop": crop,
            "crop_affine": crop_affine,
            "patch": patch,
        }
        yield require_finite_row(row, ("crop", "crop_affine", "patch"))


STUDY_COLUMNS = (
    "patient",
    "study",
    "split",
    "study_date",
    "days_since_baseline",
    "exam_index",
    "num_exams",
    "modality",
    "dims",
    "report_text",
    "has_mask",
    "has_lung_mask",
    "lung_voxels",
    "lung_volume_ml",
    "mask_volume_ml",
    "volume",
    "mask",
    "lung_mask",
    "radiograph",
    "radiograph_affine",
    "source_shape",
    "source_affine",
    "volume_affine",
)
STUDY_TENSORS = (
    "volume",
    "mask",
    "lung_mask",
    "radiograph",
    "radiograph_affine",
    "source_affine",
    "volume_affine",
    "lung_volume_ml",
    "mask_volume_ml",
)


def study_row(result: dict[str, Any]) -> dict[str, Any]:
    return require_finite_row({k: result[k] for k in STUDY_COLUMNS}, STUDY_TENSORS)


def narrow_study_types(batch: pa.Table) -> pa.Table:
    """Ray Data stores a row's numpy scalars as int64/double: `dims` back to int8, as the
    studies table declares it."""
    return batch.set_column(batch.schema.get_field_index("dims"), "dims", batch["dims"].cast(pa.int8()))


def quarantine_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"patient": result["patient"], "study": result["study"], "path": result["rel_path"]}
    if result["status"] == QUARANTINED:
        return [{**base, "nodule_id": None, "reason": result["reason"], "message": result["message"]}]
    return [
        {**base, "nodule_id": f["nodule_id"], "reason": f["reason"], "message": f["message"]}
        for f in json.loads(result["findings_json"])
        if f["status"] == QUARANTINED
    ]


def scrub_root(row: dict[str, Any], root: Path) -> dict[str, Any]:
    """Second line of defence behind study_processing.relative_message: no quarantine
    message names the manifest folder's absolute path (it may hold identifiers)."""
    message = row["message"]
    for prefix in (f"{root}{os.sep}", str(root)):
        message = message.replace(prefix, "")
    return {**row, "message": message}


def _write_table(ds, folder: Path, cfg: IngestConfig, rows: int) -> None:
    """One Ray Data execution per table, hive-partitioned by split (`split=train/`)."""
    if rows:
        ds.write_parquet(str(folder), partition_cols=["split"], min_rows_per_file=cfg.rows_per_file)


def _split_counts(summaries: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """Rows per split of the nodules and studies tables, from the per-study summaries."""
    nodules, studies = Counter(), Counter()
    for r in summaries:
        if r["status"] == OK:
            studies[r["split"]] += 1
            nodules[r["split"]] += sum(f["status"] == OK for f in json.loads(r["findings_json"]))
    return {s: nodules[s] for s in SPLITS}, {s: studies[s] for s in SPLITS}


def _dims_counts(summaries: list[dict[str, Any]]) -> dict[str, int]:
    """Ingested studies by kind: volumes (dims 3) and single-plane images (dims 2)."""
    dims = Counter(int(r["dims"]) for r in summaries if r["status"] == OK)
    return {"volumes": dims[3], "radiographs": dims[2]}


def run_ingest(
    cfg: IngestConfig,
    privacy: PrivacyConfig | None = None,
    ray_cfg: RayConfig | None = None,
    manifest: Manifest | None = None,
) -> dict[str, Any]:
    """Ingest `cfg.manifest` into `cfg.output`; returns the dataset card."""
    import ray

    from cohortcast.ray_runtime import ensure_ray

    out = Path(cfg.output)
    manifest = manifest or load_manifest(cfg.manifest)
    pseudo = Pseudonymizer.from_config(privacy or PrivacyConfig())
    fingerprint = content_fingerprint(manifest, cfg, pseudo)
    card_path = out / CARD
    if card_path.is_file() and not cfg.overwrite:
        card = json.loads(card_path.read_text())
        if card.get("fingerprint") == fingerprint:
            log.info("%s is up to date (fingerprint %s); nothing to do", out, fingerprint[:12])
            return {**card, "reused": True}
        log.info("%s was built from another manifest or config; rebuilding", out)
    if clear_stale_temps(out):
        log.info("removed the partial output of an interrupted run next to %s", out)

    tasks = build_tasks(manifest, pseudo, cfg)
    ensure_ray(ray_cfg)
    # A few blocks per CPU: one-study blocks drown in per-task overhead (measured 2x
    # slower end to end), a single block per CPU balances badly when studies differ.
    blocks = max(1, min(len(tasks), _BLOCKS_PER_CPU * int(ray.cluster_resources().get("CPU", 1))))
    started = time.perf_counter()
    log.info(
        "ingest: reading %d studies of %d patients into %s (%d Ray Data blocks)",
        len(tasks),
        len({t["patient"] for t in tasks}),
        out,
        blocks,
    )
    results = (
        ray.data.from_items(tasks, override_num_blocks=blocks)
        .map(process_study, fn_kwargs={"cfg": cfg}, num_cpus=cfg.num_cpus_per_task)
        .materialize()
    )
    # Light columns only: the driver never holds image tensors.
    summaries = list(
        results.select_columns(
            ["patient", "study", "split", "rel_path", "status", "reason", "message", "findings_json", "dims"]
        ).iter_rows()
    )
    quarantine = [scrub_root(row, manifest.root) for r in summaries for row in quarantine_rows(r)]
    for row in quarantine:
        log.warning(
            "quarantined %s%s: %s",
            row["study"],
            f" nodule {row['nodule_id']}" if row["nodule_id"] else "",
            row["message"],
        )
    nodule_counts, study_counts = _split_counts(summaries)
    seconds = time.perf_counter() - started
    log.info(
        "ingest: read %d studies in %s (%s studies/s): %d nodule crops, %d quarantined; writing the tables",
        len(summaries),
        format_duration(seconds),
        format_rate(len(summaries) / max(seconds, 1e-9)),
        sum(nodule_counts.values()),
        len(quarantine),
    )

    with atomic_folder(out, overwrite=True) as tmp:
        _write_table(results.flat_map(explode_nodules), tmp / "nodules", cfg, sum(nodule_counts.values()))
        _write_table(
            results.filter(expr=f"status == '{OK}'")
            .map(study_row)
            .map_batches(narrow_study_types, batch_format="pyarrow"),
            tmp / "studies",
            cfg,
            sum(study_counts.values()),
        )
        pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), tmp / "quarantine.parquet")
        card = _card(
            cfg, manifest, fingerprint, tasks, quarantine, nodule_counts, study_counts, _dims_counts(summaries)
        )
        write_text_atomic(tmp / CARD, json.dumps(card, indent=2))
    return {**card, "reused": False}


def finding_counts(
    tasks: list[dict[str, Any]], quarantine: list[dict[str, Any]], nodule_counts: dict[str, int]
) -> dict[str, int]:
    """Every manifest finding lands in exactly one bucket: cropped (a nodule row),
    quarantined with its study, or quarantined itself (e.g. outside the image)."""
    bad_studies = {q["study"] for q in quarantine if q["nodule_id"] is None}
    return {
        "findings": sum(len(json.loads(t["findings_json"])) for t in tasks),
        "findings_cropped": sum(nodule_counts.values()),
        "findings_with_quarantined_study": sum(
            len(json.loads(t["findings_json"])) for t in tasks if t["study"] in bad_studies
        ),
        "findings_quarantined": sum(1 for q in quarantine if q["nodule_id"] is not None),
    }


def _card(cfg, manifest, fingerprint, tasks, quarantine, nodule_counts, study_counts, study_dims) -> dict[str, Any]:
    bad_studies = sum(1 for q in quarantine if q["nodule_id"] is None)
    findings = finding_counts(tasks, quarantine, nodule_counts)
    if findings["findings"] != (
        findings["findings_cropped"] + findings["findings_with_quarantined_study"] + findings["findings_quarantined"]
    ):
        log.error("finding counts do not add up (a bug; the tables are right, the card is not): %s", findings)
    return {
        "cohortcast_version": __version__,
        "fingerprint": fingerprint,
        "manifest_fingerprint": manifest.fingerprint(),
        "config": to_dict(cfg),
        "counts": {
            "patients": len({t["patient"] for t in tasks}),
            "studies": len(tasks),
            "studies_ingested": len(tasks) - bad_studies,
            "studies_quarantined": bad_studies,
            **findings,
            "nodule_rows": nodule_counts,
            "study_rows": study_counts,
            "study_dims": study_dims,
        },
        "quarantine_reasons": dict(Counter(q["reason"] for q in quarantine)),
        "tables": {
            "nodules": {
                "crop": [cfg.crop_size, cfg.crop_size],
                "patch": [cfg.patch_size] * 3,
                "crop_spacing_mm": cfg.crop_spacing_mm,
                "patch_spacing_mm": cfg.patch_spacing_mm,
            },
            "studies": {
                "volume": list(cfg.volume_shape),
                "mask": list(cfg.volume_shape),
                "lung_mask": list(cfg.volume_shape),
                "radiograph": [cfg.radiograph_size, cfg.radiograph_size],
                "antialias": cfg.antialias,
            },
            "intensity": {"hu_window": list(cfg.hu_window), "normalise": cfg.normalise},
        },
        "split": dataclasses.asdict(cfg.split),
    }
