"""`cohortcast synth`: a seeded, deterministic synthetic longitudinal cohort written as
real DICOM series and NIfTI files plus the manifest (see cohortcast.data.manifest).

Each patient is generated from its own seed streams (cohort seed, patient index; see
data.synthetic.plan), so the output is identical whatever the number of worker processes.
The CLDM options (SynthConfig: fibrosis_model "trend", lung_masks, radiographs) add lung
masks, noisy fibrosis trajectories, and per exam a DX radiograph with a CheXpert-style
report; off (the defaults), the cohort is bit-identical to the NAMD one.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cohortcast.config import SynthConfig
from cohortcast.data.manifest import write_tables
from cohortcast.data.synthetic.chest import (
    HU_FLUID,
    effusion_region,
    expose,
    line_integral,
    quantile_mask,
    with_heart,
)
from cohortcast.data.synthetic.clinical import Patient, lobe_of
from cohortcast.data.synthetic.phantom import (
    Grid,
    add_noise,
    fibrosis_mask,
    fibrosis_score,
    make_anatomy,
    nodule_centre,
    render_fibrosis,
    render_nodule,
)
from cohortcast.data.synthetic.plan import plan_patient, streams
from cohortcast.data.synthetic.reports import write_report
from cohortcast.io.atomic import atomic_folder
from cohortcast.io.dicom import DicomIdentity, write_ct_series, write_dx_image
from cohortcast.io.nifti import write_nifti
from cohortcast.io.volume import Volume

_BASE_FIBROSIS_EXTENT = 0.12  # extent at baseline for patients with fibrosis


def _fibrosis_extent(patient: Patient, years: float) -> float:
    return 0.0 if patient.fibrosis_rate == 0 else min(1.0, _BASE_FIBROSIS_EXTENT + patient.fibrosis_rate * years)


def _generate_patient(cfg: SynthConfig, index: int, out: Path) -> dict[str, list[dict]]:
    rngs = streams(cfg.seed, index)
    plan = plan_patient(cfg, index, rngs)
    patient = plan.patient
    image_rng = rngs.image
    grid = Grid((cfg.num_slices, cfg.image_size, cfg.image_size), cfg.pixel_spacing_mm, cfg.slice_thickness_mm)
    anatomy = make_anatomy(rngs.anatomy, grid)
    if cfg.radiographs:
        anatomy = with_heart(anatomy, grid, plan.ctr)
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

    score = fibrosis_score(patient.fibrosis_seed, anatomy, grid) if plan.fractions is not None else None
    prior_fraction, prior_exam = None, None
    for k, date in enumerate(patient.exam_dates):
        years = (date - patient.exam_dates[0]).days / 365.25
        hu = anatomy.hu.copy()
        # The aerated lung: pleural fluid (radiograph cohorts) displaces it at the bases.
        fluid = effusion_region(anatomy, grid, *plan.effusions[k]) if cfg.radiographs else None
        lung = anatomy.lung if fluid is None else anatomy.lung & ~fluid
        mask = None
        if score is not None:
            mask = quantile_mask(score, lung, float(plan.fractions[k]))
            render_fibrosis(hu, mask, image_rng)
        elif patient.fibrosis_rate > 0:
            mask = fibrosis_mask(patient.fibrosis_seed, anatomy, grid, _fibrosis_extent(patient, years))
            if fluid is not None:
                mask &= lung
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
        if fluid is not None:
            hu[fluid] = HU_FLUID
        volume = Volume(add_noise(hu, image_rng, cfg.noise_hu), grid.affine(), modality="CT")
        folder = f"images/p{index:05d}"
        as_nifti = bool(image_rng.random() < cfg.nifti_fraction)
        rel_path = f"{folder}/e{k + 1}.nii.gz" if as_nifti else f"{folder}/e{k + 1}_dicom"
        identity = DicomIdentity(
            patient_name=patient.name,
            patient_id=patient.mrn,
            birth_date=patient.birth_date,
            sex=patient.gender[0],
            accession=f"ACC{cfg.seed:03d}{index:05d}{k:02d}",
            institution="Synthetic General Hospital",
            study_date=date,
            uid_seed=f"{cfg.seed}/{index}/{k}",
        )
        if as_nifti:
            (out / folder).mkdir(parents=True, exist_ok=True)
            write_nifti(volume, out / rel_path)
        else:
            write_ct_series(volume, out / rel_path, identity)
        mask_path = None
        fraction = float(mask.sum()) / max(int(lung.sum()), 1) if mask is not None else 0.0
        if mask is not None:
            mask_path = f"{folder}/e{k + 1}_fibrosis_mask.nii.gz"
            write_nifti(Volume(mask.astype(np.float32), grid.affine()), out / mask_path, dtype=np.uint8)
        ct_row = {
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
        if cfg.lung_masks:
            ct_row["lung_mask_path"] = f"{folder}/e{k + 1}_lung_mask.nii.gz"
            write_nifti(Volume(lung.astype(np.float32), grid.affine()), out / ct_row["lung_mask_path"], dtype=np.uint8)
        rows["studies"].append(ct_row)
        if cfg.radiographs:
            # The report reads the trajectory's fraction (trend) or the mask's (linear).
            fibrosis = float(plan.fractions[k]) if plan.fractions is not None else fraction
            reported = plan.radiograph_report(k, fibrosis, prior_exam)
            rows["studies"].append(_radiograph(cfg, rngs, out, hu, grid, reported.text, k, identity, ct_row))
            prior_exam = reported.exam
        prior_fraction = fraction
    return rows


def _radiograph(cfg, rngs, out, hu, grid, text, k, identity, ct_row) -> dict:
    """Expose the exam's (noise-free) phantom and write the DX file: its study row."""
    pixels = expose(line_integral(hu, grid, cfg.radiograph_pixel_mm), rngs.xray)
    rel_path = ct_row["path"].rsplit("/", 1)[0] + f"/e{k + 1}_dx.dcm"
    dx_identity = replace(
        identity,
        accession=identity.accession + "X",
        uid_seed=identity.uid_seed + "/dx",
        series_description="Synthetic chest radiograph",
        image_type=("ORIGINAL", "PRIMARY"),
    )
    write_dx_image(pixels, out / rel_path, dx_identity, (cfg.radiograph_pixel_mm,) * 2)
    row = {
        "study_id": f"{ct_row['study_id']}-DX",
        "patient_id": ct_row["patient_id"],
        "study_date": ct_row["study_date"],
        "modality": "DX",
        "path": rel_path,
        "mask_path": None,
        "report_text": text,
    }
    if cfg.lung_masks:
        row["lung_mask_path"] = None
    return row


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
