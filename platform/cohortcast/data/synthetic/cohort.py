"""`cohortcast synth`: a seeded, deterministic synthetic longitudinal cohort written as
real DICOM series and NIfTI files plus the manifest (see cohortcast.data.manifest).

Each patient is generated from its own seed stream (cohort seed, patient index), so the
output is identical whatever the number of worker processes.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cohortcast.config import SynthConfig
from cohortcast.data.manifest import write_tables
from cohortcast.data.synthetic.clinical import Patient, lobe_of, make_patient
from cohortcast.data.synthetic.phantom import (
    Grid,
    add_noise,
    fibrosis_mask,
    make_anatomy,
    nodule_centre,
    render_fibrosis,
    render_nodule,
)
from cohortcast.data.synthetic.reports import write_report
from cohortcast.io.atomic import atomic_folder
from cohortcast.io.dicom import DicomIdentity, write_ct_series
from cohortcast.io.nifti import write_nifti
from cohortcast.io.volume import Volume

_BASE_FIBROSIS_EXTENT = 0.12  # extent at baseline for patients with fibrosis


def _fibrosis_extent(patient: Patient, years: float) -> float:
    return 0.0 if patient.fibrosis_rate == 0 else min(1.0, _BASE_FIBROSIS_EXTENT + patient.fibrosis_rate * years)


def _generate_patient(cfg: SynthConfig, index: int, out: Path) -> dict[str, list[dict]]:
    seq = np.random.SeedSequence([cfg.seed, index])
    clinical_rng, anatomy_rng, image_rng = (np.random.default_rng(s) for s in seq.spawn(3))
    patient = make_patient(
        clinical_rng,
        index,
        cfg.min_exams,
        cfg.max_exams,
        cfg.max_nodules,
        cfg.malignant_fraction,
        cfg.fibrosis_fraction,
    )
    grid = Grid((cfg.num_slices, cfg.image_size, cfg.image_size), cfg.pixel_spacing_mm, cfg.slice_thickness_mm)
    anatomy = make_anatomy(anatomy_rng, grid)
    rows: dict[str, list[dict]] = {"patients": [], "studies": [], "findings": [], "labels": []}
    rows["patients"].append(
        {
            "patient_id": patient.mrn,
            "age": patient.age,
            "gender": patient.gender,
            "diagemph": patient.diagemph,
            **patient.family,
        }
    )
    for nod in patient.nodules:
        rows["labels"].append({"patient_id": patient.mrn, "nodule_id": nod.nodule_id, "malignant": int(nod.malignant)})

    lung_voxels = max(int(anatomy.lung.sum()), 1)
    prior_fraction = None
    for k, date in enumerate(patient.exam_dates):
        years = (date - patient.exam_dates[0]).days / 365.25
        hu = anatomy.hu.copy()
        mask = None
        if patient.fibrosis_rate > 0:
            mask = fibrosis_mask(patient.fibrosis_seed, anatomy, grid, _fibrosis_extent(patient, years))
            render_fibrosis(hu, mask, image_rng)
        report_nodules = []
        study_id = f"{patient.mrn}-E{k + 1}"
        for nod in patient.nodules:
            state = nod.states[k]
            centre = nodule_centre(anatomy, nod)
            render_nodule(hu, grid, centre, nod, state)
            lo, hi = anatomy.lung_boxes[nod.side]
            rel = (centre - lo) / (hi - lo)
            lobe = lobe_of(nod.side, float(rel[2]), float(rel[1]))
            report_nodules.append((nod.nodule_id, lobe, state, nod.states[k - 1] if k else None))
            rows["findings"].append(
                {
                    "study_id": study_id,
                    "nodule_id": nod.nodule_id,
                    "center_x_mm": round(float(centre[0]), 3),
                    "center_y_mm": round(float(centre[1]), 3),
                    "center_z_mm": round(float(centre[2]), 3),
                    "SCT_LONG_DIA": round(state.long_mm, 1),
                    "SCT_PERP_DIA": round(state.perp_mm, 1),
                    "SCT_PRE_ATT": state.attenuation,
                    "SCT_MARGINS": state.margins,
                    "SCT_EPI_LOC": lobe,
                }
            )
        volume = Volume(add_noise(hu, image_rng, cfg.noise_hu), grid.affine(), modality="CT")
        folder = f"images/p{index:05d}"
        as_nifti = bool(image_rng.random() < cfg.nifti_fraction)
        rel_path = f"{folder}/e{k + 1}.nii.gz" if as_nifti else f"{folder}/e{k + 1}_dicom"
        if as_nifti:
            (out / folder).mkdir(parents=True, exist_ok=True)
            write_nifti(volume, out / rel_path)
        else:
            write_ct_series(
                volume,
                out / rel_path,
                DicomIdentity(
                    patient_name=patient.name,
                    patient_id=patient.mrn,
                    birth_date=patient.birth_date,
                    sex=patient.gender[0],
                    accession=f"ACC{cfg.seed:03d}{index:05d}{k:02d}",
                    institution="Synthetic General Hospital",
                    study_date=date,
                    uid_seed=f"{cfg.seed}/{index}/{k}",
                ),
            )
        mask_path = None
        fraction = float(mask.sum()) / lung_voxels if mask is not None else 0.0
        if mask is not None:
            mask_path = f"{folder}/e{k + 1}_fibrosis_mask.nii.gz"
            write_nifti(Volume(mask.astype(np.float32), grid.affine()), out / mask_path, dtype=np.uint8)
        rows["studies"].append(
            {
                "study_id": study_id,
                "patient_id": patient.mrn,
                "study_date": date,
                "modality": "CT",
                "path": rel_path,
                "mask_path": mask_path,
                "report_text": write_report(
                    date, patient.exam_dates[k - 1] if k else None, report_nodules, fraction, prior_fraction
                ),
            }
        )
        prior_fraction = fraction
    return rows


def _generate_one(args: tuple[SynthConfig, int, Path]) -> dict[str, list[dict]]:
    return _generate_patient(*args)


def generate_cohort(
    cfg: SynthConfig, out: str | Path, workers: int = 1, overwrite: bool = False, progress: bool = True
) -> dict[str, int]:
    """Write the cohort into `out` (the manifest folder); returns counts."""
    out = Path(out)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        jobs = [(cfg, i, tmp) for i in range(cfg.patients)]
        bar = tqdm(total=cfg.patients, desc="synth patients", unit="pt", disable=not progress)
        tables: dict[str, list[dict]] = {"patients": [], "studies": [], "findings": [], "labels": []}
        if workers > 1:
            # spawn, not fork: the caller may hold Ray's and torch's threads, which a
            # forked child would inherit in whatever state they were in
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = pool.map(_generate_one, jobs, chunksize=4)
                for rows in results:
                    [tables[name].extend(rows[name]) for name in tables]
                    bar.update()
        else:
            for job in jobs:
                rows = _generate_one(job)
                [tables[name].extend(rows[name]) for name in tables]
                bar.update()
        bar.close()
        frames = {name: pd.DataFrame(rows) for name, rows in tables.items()}
        write_tables(frames, tmp)
        counts = {name: len(frame) for name, frame in frames.items()}
        (tmp / "synth.json").write_text(json.dumps({"config": asdict(cfg), "counts": counts}, indent=2))
    return counts
