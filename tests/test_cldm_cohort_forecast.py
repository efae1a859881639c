"""The CLDM cohort forecasting job on a hand-built ingested `studies` table (3 patients,
CT and radiograph trajectories with same-day studies) and a tiny random CLDM bundle:
which follow-ups become cases and from which priors (also as a property over random
trajectories), every case answering exactly what the bundle forecasts for it alone,
CT images on the study grid, atomic per-case folders, resume after an interruption,
refused setting changes and mismatched cohorts."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cldm_fixtures import IMAGE, VOLUME, write_tiny_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

from cohortcast.config.cldm_forecast import CLDMForecastJobConfig
from cohortcast.errors import MissingInputError
from cohortcast.inference.cldm_cohort_forecast import (
    CLDMCohortMismatch,
    make_cases,
    read_cldm_forecasts,
    run_cldm_cohort_forecast,
)
from cohortcast.inference.cohort_forecast import ForecastSettingsMismatch, case_key, tensor_column
from cohortcast.io.volume import Volume
from cohortcast.models.cldm_bundle import CLDMBundle

pytestmark = pytest.mark.timeout(600)

# (patient, kind, days since baseline, has mask); same-day studies on purpose.
STUDIES = [
    *(("P1", "ct", d, True) for d in (0, 100, 300, 420)),
    *(("P1", "radiograph", d, False) for d in (0, 150)),
    *(("P2", "ct", d, False) for d in (0, 0)),  # a same-day pair: nothing earlier to forecast from
    ("P2", "radiograph", 0, False),
    *(("P3", "ct", d, m) for d, m in ((0, True), (200, True))),
    *(("P3", "radiograph", d, False) for d in (0, 90, 90)),
]
AFFINE = np.diag([2.0, 1.5, 1.5, 1.0])  # (i, j, k) -> LPS mm: 2 x 1.5 x 1.5 mm voxels


def _date(days: int) -> str:
    return str(np.datetime64("2020-01-01") + np.timedelta64(days, "D"))


def write_ingested(folder, shapes=None) -> None:
    rng = np.random.default_rng(0)
    n = len(STUDIES)
    volumes = np.zeros((n, *VOLUME), np.float32)
    radiographs = np.zeros((n, *IMAGE), np.float32)
    masks = np.zeros((n, *VOLUME), np.uint8)
    for i, (_, kind, _, has_mask) in enumerate(STUDIES):
        if kind == "ct":
            volumes[i] = rng.uniform(-1, 1, VOLUME)
            masks[i] = (rng.uniform(size=VOLUME) > 0.8) if has_mask else 0
        else:
            radiographs[i] = rng.uniform(-1, 1, IMAGE)
    table = pa.table(
        {
            "patient": [s[0] for s in STUDIES],
            "study": [f"S{i:02d}" for i in range(n)],
            "study_date": [_date(s[2]) for s in STUDIES],
            "days_since_baseline": [s[2] for s in STUDIES],
            "dims": [3 if s[1] == "ct" else 2 for s in STUDIES],
            "volume": tensor_column(volumes),
            "radiograph": tensor_column(radiographs),
            "mask": tensor_column(masks),
            "has_mask": [s[3] for s in STUDIES],
            "volume_affine": tensor_column(np.repeat(AFFINE.reshape(1, 16), n, 0)),
            "report_text": [
                f"FINDINGS: report {i}. IMPRESSION: none." if s[1] != "ct" else "" for i, s in enumerate(STUDIES)
            ],
        }
    )
    (folder / "studies" / "split=test").mkdir(parents=True)
    pq.write_table(table, folder / "studies" / "split=test" / "part-0.parquet")
    shapes = shapes or {"volume": list(VOLUME), "radiograph": list(IMAGE)}
    (folder / "card.json").write_text(json.dumps({"fingerprint": "f1", "tables": {"studies": shapes}}))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cldm-cohort")
    write_ingested(root / "ingested")
    return root, write_tiny_bundle(root / "train")


def job_for(root, model, **kw) -> CLDMForecastJobConfig:
    settings = dict(
        model=str(model),
        ingested=str(root / "ingested"),
        output=str(root / "out"),
        split="test",
        num_samples=2,
        inference_steps=2,
        seed=4,
        cases_per_batch=3,
    )
    job = CLDMForecastJobConfig(**{**settings, **kw})
    job.validate()
    return job


def test_the_whole_split_is_forecast_as_each_case_alone_and_resumes(cohort, ray_session):
    root, model = cohort
    job = job_for(root, model)
    summary = run_cldm_cohort_forecast(job)
    assert summary["cases_by_kind"] == {"ct": 4, "radiograph": 3} and summary["skipped"] == {"same_day_only": 1}
    assert summary["forecast_this_run"] == summary["finished"] == 7

    tables = read_cldm_forecasts(job.output)
    ct, dx = tables["ct"].to_pandas(), tables["radiograph"].to_pandas()
    ingested = pq.read_table(root / "ingested" / "studies" / "split=test").to_pandas().set_index("study")
    # P1's last CT: all three earlier CTs, oldest first; P3's second 90-day radiograph: only day 0.
    last = ct[ct.target_study == "S03"].iloc[0]
    assert json.loads(last.prior_studies) == ["S00", "S01", "S02"]
    assert json.loads(last.days_before_target) == [420.0, 320.0, 120.0]
    same_day = dx[dx.target_study == "S13"].iloc[0]
    assert json.loads(same_day.prior_studies) == ["S11"] and json.loads(same_day.days_before_target) == [90.0]

    bundle = CLDMBundle.load(model)
    for case in (last, ct[ct.target_study == "S10"].iloc[0]):  # P3's CT: its prior has a mask
        priors = json.loads(case.prior_studies)
        images = [np.asarray(ingested.loc[s, "volume"], np.float32).reshape(VOLUME) for s in priors]
        prior_mask = np.asarray(ingested.loc[priors[-1], "mask"], np.uint8).reshape(VOLUME)
        alone = bundle.forecast(
            [list(zip(images, json.loads(case.days_before_target)))],
            [case.case_id],
            2,
            seed=4,
            steps=2,
            kind="ct",
            voxel_ml=2 * 1.5 * 1.5 / 1000,
            prior_masks=[prior_mask],
        )[0]
        # The actors run torch on fewer threads than this process: float sums in another
        # order, so equal to rounding (within the job, a case is bit-identical: see the rerun).
        probability = np.asarray(case.probability).reshape(VOLUME)
        np.testing.assert_allclose(probability, alone.probability, atol=1e-5)
        clear = np.abs(alone.probability - 0.5) > 1e-4  # voxels rounding cannot flip
        assert np.array_equal(np.asarray(case["mask"]).reshape(VOLUME)[clear], alone.mask[clear])
        assert abs(int(np.asarray(case.anchored_mask).sum()) - int(alone.anchored_mask.sum())) <= 2
        assert case.fibrotic_volume_ml == pytest.approx(case.fibrotic_voxels * 0.0045)
        assert abs(case.fibrotic_voxels - alone.fibrotic_voxels) <= 2
        truth = np.asarray(ingested.loc[case.target_study, "mask"], np.uint8).reshape(VOLUME)
        assert case.target_voxels == truth.sum()
        folder = root / "out" / "cases" / case_key(case.case_id)
        image = nib.load(folder / "mask.nii.gz")
        assert np.allclose(image.affine, Volume(truth, AFFINE).to_nifti_affine())
        assert np.array_equal(
            np.transpose(np.asarray(image.dataobj), (2, 1, 0)), np.asarray(case["mask"]).reshape(VOLUME)
        )
    report_case = dx[dx.target_study == "S05"].iloc[0]
    image = np.asarray(ingested.loc["S04", "radiograph"], np.float32).reshape(IMAGE)
    alone = bundle.forecast([[(image, 150.0)]], [report_case.case_id], 2, seed=4, steps=2, kind="radiograph")[0]
    assert report_case.report == alone.report and report_case.target_report.startswith("FINDINGS: report 5")
    assert not (root / "out" / "cases" / case_key(report_case.case_id) / "mask.nii.gz").exists()

    # A rerun does nothing; an interrupted one (a case missing, a half-written folder) redoes that case only.
    assert run_cldm_cohort_forecast(job)["forecast_this_run"] == 0
    shutil.rmtree(root / "out" / "cases" / case_key(last.case_id))
    stale = root / "out" / "cases" / f".{case_key(last.case_id)}.tmp-x"
    stale.mkdir()
    again = run_cldm_cohort_forecast(job)
    assert again["forecast_this_run"] == 1 and again["finished"] == 7 and not stale.exists()
    redone = read_cldm_forecasts(job.output)["ct"].to_pandas().set_index("case_id").loc[last.case_id]
    assert np.array_equal(redone.probability, last.probability)  # a case does not depend on its batch

    with pytest.raises(ForecastSettingsMismatch, match="num_samples: 2 -> 3"):
        run_cldm_cohort_forecast(job_for(root, model, num_samples=3))
    capped = run_cldm_cohort_forecast(
        job_for(root, model, output=str(root / "capped"), kinds=("radiograph",), max_cases=2)
    )
    assert capped["forecast_this_run"] == 2 and capped["cases"] == 3


def test_mismatched_cohorts_and_models_are_refused_before_any_work(cohort, tmp_path):
    root, model = cohort
    write_ingested(tmp_path / "ingested", shapes={"volume": [8, 16, 16], "radiograph": list(IMAGE)})
    with pytest.raises(
        CLDMCohortMismatch, match=r"volumes are \[8, 16, 16\].*reads \[8, 32, 32\].*ingest.volume_shape"
    ):
        run_cldm_cohort_forecast(job_for(tmp_path, model))
    assert not (tmp_path / "out").exists()
    with pytest.raises(MissingInputError, match="no 'val' split"):
        run_cldm_cohort_forecast(job_for(root, model, split="val", output=str(tmp_path / "o")))
    no_regressor = write_tiny_bundle(tmp_path / "train", parts=("segmentation",))
    with pytest.raises(CLDMCohortMismatch, match="no regressor"):
        run_cldm_cohort_forecast(job_for(root, no_regressor, method="regressor", output=str(tmp_path / "o")))
    with pytest.raises(Exception, match="not a CLDM training output"):
        run_cldm_cohort_forecast(job_for(root, tmp_path / "nowhere", output=str(tmp_path / "o")))


@settings(max_examples=60, deadline=None)
@given(
    trajectories=st.lists(
        st.tuples(st.sampled_from(["ct", "radiograph"]), st.lists(st.integers(0, 50), min_size=1, max_size=8)),
        min_size=1,
        max_size=5,
    ),
    max_priors=st.integers(1, 4),
)
def test_cases_are_every_follow_up_from_its_earlier_studies(trajectories, max_priors):
    rows = []
    for p, (kind, days) in enumerate(trajectories):
        for j, d in enumerate(days):
            rows.append((f"P{p}", f"P{p}-{j}", _date(d), d, 3 if kind == "ct" else 2))
    table = pa.table(dict(zip(["patient", "study", "study_date", "days_since_baseline", "dims"], zip(*rows))))
    cases, skipped = make_cases(table, ("ct", "radiograph"), max_priors)
    days_of = {r[1]: r[3] for r in rows}
    follow_ups = sum(len(days) - 1 for _, days in trajectories)
    assert len(cases) + skipped["same_day_only"] == follow_ups
    assert len({c["case_id"] for c in cases}) == len(cases)
    for case in cases:
        priors, before = json.loads(case["prior_studies"]), json.loads(case["days_before_target"])
        target = days_of[case["target_study"]]
        assert 1 <= len(priors) <= max_priors and all(b > 0 for b in before)
        assert before == sorted(before, reverse=True)  # oldest first
        assert before == [float(target - days_of[s]) for s in priors]
        assert all(s.split("-")[0] == case["patient"] for s in priors)
        # the most recent earlier studies are the ones kept
        earlier = sorted(d for s, d in days_of.items() if s.split("-")[0] == case["patient"] and d < target)
        assert sorted(days_of[s] for s in priors) == earlier[-len(priors) :]
