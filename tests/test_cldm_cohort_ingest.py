"""The CLDM cohort (CT + lung and fibrosis masks + a DX radiograph per exam, written by
the synthetic generator) through `run_ingest`: dims-2 radiograph rows with their grid,
lung and lesion volumes equal to the generator's masks, exams paired by date."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import tiny_synth_config

from cohortcast.config import IngestConfig, PrivacyConfig, SplitConfig
from cohortcast.data.ingest import run_ingest
from cohortcast.data.manifest import load_manifest
from cohortcast.data.privacy import Pseudonymizer
from cohortcast.data.synthetic import generate_cohort
from cohortcast.data.synthetic.chest import radiograph_geometry
from cohortcast.data.synthetic.phantom import Grid

R = 32
VOLUME_SHAPE = (8, 24, 24)  # half the source grid on every axis: the anti-aliased path


@pytest.fixture(scope="module")
def cldm_ingested(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("cldm-ingest")
    cfg = tiny_synth_config(
        patients=2,
        seed=3,
        min_exams=2,
        max_exams=3,
        fibrosis_fraction=1.0,
        fibrosis_model="trend",
        lung_masks=True,
        radiographs=True,
        radiograph_pixel_mm=4.0,
    )
    generate_cohort(cfg, root / "cohort", progress=False)
    ingest = IngestConfig(
        manifest=str(root / "cohort"),
        output=str(root / "ingested"),
        crop_size=16,
        crop_spacing_mm=2.0,
        patch_size=8,
        volume_shape=VOLUME_SHAPE,
        radiograph_size=R,
        split=SplitConfig(1.0, 0.0, 0.0),
    )
    card = run_ingest(ingest)
    studies = pq.read_table(root / "ingested" / "studies").to_pandas()
    manifest = load_manifest(root / "cohort")
    # Back from pseudonyms to the manifest's rows (the test knows the secret; outputs do not).
    pseudo = Pseudonymizer.from_config(PrivacyConfig())
    by_pseudonym = {pseudo(s, kind="study"): s for s in manifest.studies.study_id}
    studies["study_id"] = studies.study.map(by_pseudonym)
    studies = studies.merge(manifest.studies, on="study_id", suffixes=("", "_manifest"))
    return cfg, card, studies, manifest


def test_every_exam_gives_a_ct_row_and_a_radiograph_row(cldm_ingested):
    cfg, card, studies, manifest = cldm_ingested
    assert len(studies) == len(manifest.studies) == card["counts"]["studies_ingested"]
    assert not card["quarantine_reasons"]
    ct, dx = studies[studies.modality == "CT"], studies[studies.modality == "DX"]
    assert len(ct) == len(dx) > 0 and set(ct.dims) == {3} and set(dx.dims) == {2}
    assert card["counts"]["study_dims"] == {"volumes": len(ct), "radiographs": len(dx)}
    # The CT and the DX of one exam share its date, index and count; each sequence is 0..n-1.
    pairs = ct.merge(dx, on=["patient", "study_date"], suffixes=("_ct", "_dx"))
    assert len(pairs) == len(ct)
    assert (pairs.exam_index_ct == pairs.exam_index_dx).all() and (pairs.num_exams_ct == pairs.num_exams_dx).all()
    assert (pairs.days_since_baseline_ct == pairs.days_since_baseline_dx).all()
    for _, exams in ct.groupby("patient"):
        assert sorted(exams.exam_index) == list(range(len(exams))) and set(exams.num_exams) == {len(exams)}


def test_radiograph_rows_hold_the_film_on_its_own_grid(cldm_ingested):
    cfg, _, studies, _ = cldm_ingested
    dx = studies[studies.dims == 2]
    rows, cols = radiograph_geometry(
        Grid((cfg.num_slices, cfg.image_size, cfg.image_size), cfg.pixel_spacing_mm, cfg.slice_thickness_mm),
        cfg.radiograph_pixel_mm,
    )
    pitch = cfg.radiograph_pixel_mm
    spacing = max(rows, cols) * pitch / R  # the longer side fills the grid
    for film in dx.itertuples():
        image = np.asarray(film.radiograph)
        assert image.shape == (R, R) and image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.1
        affine = np.asarray(film.radiograph_affine).reshape(4, 4)
        # Along a row: the patient's left (+x); down a column: the feet (-z); square pixels.
        np.testing.assert_allclose(affine[:3, 0], [spacing, 0, 0], atol=1e-9)
        np.testing.assert_allclose(affine[:3, 1], [0, 0, -spacing], atol=1e-9)
        # Origin 0 at the first detector pixel (DX has no position): the grid's centre is the film's.
        centre = affine @ np.array([(R - 1) / 2, (R - 1) / 2, 0, 1])
        np.testing.assert_allclose(centre[:3], [(cols - 1) / 2 * pitch, 0, -(rows - 1) / 2 * pitch], atol=1e-6)
        # The film is wider than tall: rows beyond its top and bottom edges are padding (-1).
        assert cols > rows and (image[0] == -1).all() and (image[-1] == -1).all()
        assert not np.asarray(film.volume).any() and not film.has_lung_mask and film.lung_voxels == 0
        assert film.report_text.startswith("FINDINGS: ")


def test_lung_and_fibrosis_volumes_are_the_generators_masks(cldm_ingested):
    cfg, _, studies, manifest = cldm_ingested
    ct = studies[studies.dims == 3]
    voxel_ml = cfg.pixel_spacing_mm**2 * cfg.slice_thickness_mm / 1000.0
    assert ct.has_lung_mask.all() and ct.has_mask.all()
    for study in ct.itertuples():
        lung = np.asarray(nib.load(manifest.resolve(study.lung_mask_path)).dataobj) > 0
        fibrosis = np.asarray(nib.load(manifest.resolve(study.mask_path)).dataobj) > 0
        assert study.lung_volume_ml == pytest.approx(lung.sum() * voxel_ml)
        assert study.mask_volume_ml == pytest.approx(fibrosis.sum() * voxel_ml)
        small = np.asarray(study.lung_mask)
        assert small.shape == VOLUME_SHAPE and set(np.unique(small)) <= {0, 1}
        # Nearest-neighbour at half size on every axis: about an eighth of the voxels.
        assert study.lung_voxels == np.count_nonzero(small)
        assert study.lung_voxels == pytest.approx(lung.sum() / 8, rel=0.2)
        assert np.asarray(study.volume).shape == VOLUME_SHAPE and not np.asarray(study.radiograph).any()
