"""Cohort-scale CLDM forecasting on Ray Data (jobs/forecast_cldm.py, `cohortcast forecast --job cldm`).

Cases: every follow-up study (CT and/or radiograph, `cldm.forecast.kinds`) of a split of
the ingested `studies` table, forecast from the patient's earlier studies of the same
kind (taken before the follow-up's date; the most recent `max_priors` of the bundle) to
the follow-up's date. The case list is built on the driver from the table's small
columns; an actor pool holds the CLDMBundle (loaded once per actor) and reads each
batch's images from the Parquet table itself. Samples are seeded by (seed, case id, k),
so a case's forecast does not depend on its batch or actor.

Output, one folder per case, written under a temp name and renamed when complete (a
case is fully there or absent: reruns skip finished cases, an interrupted run loses at
most the cases in flight):

    OUTPUT/cases/<case key>/forecast.parquet   one row: ids (pseudonyms), kind, dates, the
                                                prior studies and days before the target,
                                                seed, volumes, report; tensors (Arrow's
                                                fixed_shape_tensor): token mean/variance,
                                                CT probability, its variance, mask,
                                                anchored mask, the real follow-up's mask
    OUTPUT/cases/<case key>/{probability,mask,anchored_mask,target_mask}.nii.gz
                                                CT: on the ingested study grid (LPS affine)
    OUTPUT/summary.json                          counts of the last run
    OUTPUT/settings.json                         what the cases were forecast with: another
                                                model or setting into the same folder is
                                                refused, never mixed in
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from cohortcast.config.cldm_forecast import CLDMForecastJobConfig
from cohortcast.errors import CohortcastError, MissingInputError
from cohortcast.inference.cohort_forecast import (
    case_key,
    check_settings,
    finished_cases,
    tensor_column,
    write_summary,
)

log = logging.getLogger(__name__)

CASE_FILE = "forecast.parquet"  # the same name finished_cases looks for
CASE_FORMAT = 1
KIND_DIMS = {"ct": 3, "radiograph": 2}
IMAGE_COLUMN = {"ct": "volume", "radiograph": "radiograph"}
META_COLUMNS = ["patient", "study", "study_date", "days_since_baseline", "dims"]
BUNDLE_PARTS = ("encoder", "diffusion", "segmentation", "report", "regressor")
# Every case row has these, typed, so cases with and without a mask or report concatenate.
SCALAR_TYPES = {
    "case_id": "string",
    "patient": "string",
    "kind": "string",
    "target_study": "string",
    "target_date": "string",
    "prior_studies": "string",  # JSON list, oldest first
    "days_before_target": "string",  # JSON list, same order
    "priors_used": "int64",
    "method": "string",
    "seed": "int64",
    "num_samples": "int64",
    "inference_steps": "int64",
    "fibrotic_voxels": "int64",
    "fibrotic_volume_ml": "float64",
    "sample_voxels": "string",  # JSON list, one per sample
    "anchored_voxels": "int64",
    "target_voxels": "int64",
    "report": "string",
    "target_report": "string",
}


class CLDMCohortMismatch(CohortcastError, ValueError):
    """The ingested studies are not what the bundle's encoder reads."""

    http_status = 409


def studies_folder(ingested: str | Path, split: str) -> Path:
    folder = Path(ingested) / "studies" / f"split={split}"
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: the ingested cohort has no {split!r} split of whole studies")
    return folder


def check_cohort(bundle_info: dict[str, Any], card: dict[str, Any], kinds: tuple[str, ...]) -> None:
    """Before any work: the bundle forecasts every asked kind, and the ingested images
    are the shapes its encoder reads."""
    shapes = card.get("tables", {}).get("studies", {})
    for kind in kinds:
        if kind not in bundle_info["kinds"]:
            raise CLDMCohortMismatch(f"cldm.forecast.kinds: the model forecasts {bundle_info['kinds']}, not {kind!r}")
        ingested = shapes.get(IMAGE_COLUMN[kind])
        expected = bundle_info["image_shapes"][kind]
        if ingested is not None and list(ingested) != list(expected):
            raise CLDMCohortMismatch(
                f"the ingested {IMAGE_COLUMN[kind]}s are {list(ingested)} but the model's encoder reads "
                f"{list(expected)}; ingest with ingest.{'volume_shape' if kind == 'ct' else 'radiograph_size'} "
                "set to the model's size"
            )


def make_cases(table, kinds: tuple[str, ...], max_priors: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The studies table's metadata -> one case per follow-up study, and what was skipped.

    A prior is an earlier study of the same kind taken *before* the target's date (a
    same-day study is not a prior: days before the target must be > 0); the most recent
    `max_priors` are kept, oldest first."""
    frame = table.to_pandas()
    cases, skipped = [], {"same_day_only": 0}
    for kind in kinds:
        rows = frame[frame["dims"] == KIND_DIMS[kind]]
        for patient, studies in rows.sort_values(["patient", "days_since_baseline", "study"]).groupby("patient"):
            days = studies["days_since_baseline"].to_numpy(np.float64)
            ids = studies["study"].tolist()
            dates = [str(d) for d in studies["study_date"]]
            for t in range(1, len(ids)):
                earlier = [j for j in range(t) if days[j] < days[t]][-max_priors:]
                if not earlier:
                    skipped["same_day_only"] += 1
                    continue
                cases.append(
                    {
                        "case_id": f"{patient}/{kind}/{ids[t]}",
                        "patient": str(patient),
                        "kind": kind,
                        "target_study": ids[t],
                        "target_date": dates[t][:10],
                        "prior_studies": json.dumps([ids[j] for j in earlier]),
                        "days_before_target": json.dumps([float(days[t] - days[j]) for j in earlier]),
                    }
                )
    return cases, skipped


def forecast_settings(job: CLDMForecastJobConfig, card: dict[str, Any]) -> dict[str, Any]:
    """Everything a finished case depends on: the bundle's files, the sampling settings,
    the split and the ingested data."""
    from cohortcast.io.stage_outputs import folder_digest

    model = Path(job.model)
    return {
        "case_format": CASE_FORMAT,
        "model": str(job.model),
        "model_digest": {p: folder_digest(model / p) for p in BUNDLE_PARTS if (model / p).is_dir()},
        "split": job.split,
        "method": job.method,
        "num_samples": job.num_samples,
        "inference_steps": job.inference_steps,
        "seed": job.seed,
        "ingest_fingerprint": card.get("fingerprint"),
        # Only when set: folders finished before samplers were selectable stay resumable.
        **({"sampler": job.sampler} if job.sampler else {}),
    }


def _column_array(table, name: str, dtype) -> np.ndarray:
    return np.asarray(table.column(name).combine_chunks().to_numpy_ndarray(), dtype)


class CLDMCaseForecaster:
    """Ray Data actor: a batch of cases -> forecasts written to per-case folders."""

    def __init__(self, job: CLDMForecastJobConfig):
        from cohortcast.models.cldm_bundle import CLDMBundle

        self.bundle = CLDMBundle.load(job.model)
        self.job, self.cases = job, Path(job.output) / "cases"
        self.folder = studies_folder(job.ingested, job.split)

    def _read(self, kind: str, studies: list[str]) -> dict[str, dict[str, Any]]:
        """The studies' images (and what the output needs of them), by study pseudonym."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads
        import ray.data  # noqa: F401  (registers Ray's tensor extension types with pyarrow)

        image = IMAGE_COLUMN[kind]
        columns = ["study", image, "report_text"] + (["mask", "has_mask", "volume_affine"] if kind == "ct" else [])
        table = pads.dataset(str(self.folder), format="parquet").to_table(
            columns=columns, filter=pc.field("study").isin(sorted(set(studies)))
        )
        arrays = {image: _column_array(table, image, np.float32)}
        if kind == "ct":
            arrays["mask"] = _column_array(table, "mask", np.uint8)
            arrays["volume_affine"] = _column_array(table, "volume_affine", np.float64).reshape(-1, 4, 4)
        rows = {}
        for i, study in enumerate(table.column("study").to_pylist()):
            row = {"image": arrays[image][i], "report": table.column("report_text")[i].as_py() or ""}
            if kind == "ct":
                has_mask = bool(table.column("has_mask")[i].as_py())
                row.update(mask=arrays["mask"][i] if has_mask else None, affine=arrays["volume_affine"][i])
            rows[study] = row
        missing = sorted(set(studies) - set(rows))
        if missing:
            raise MissingInputError(f"{self.folder}: {len(missing)} studies are missing (e.g. {missing[0]})")
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        started = time.perf_counter()
        ids = [str(c) for c in batch["case_id"]]
        for kind in sorted(set(str(k) for k in batch["kind"])):
            picks = [i for i, k in enumerate(batch["kind"]) if str(k) == kind]
            priors_of = [json.loads(str(batch["prior_studies"][i])) for i in picks]
            days_of = [json.loads(str(batch["days_before_target"][i])) for i in picks]
            targets = [str(batch["target_study"][i]) for i in picks]
            rows = self._read(kind, [s for p in priors_of for s in p] + targets)
            masks = [rows[p[-1]].get("mask") for p in priors_of]
            anchor = kind in self.bundle.info()["anchoring_kinds"] and any(m is not None for m in masks)
            voxel_ml = [_voxel_ml(rows[t].get("affine")) for t in targets]
            forecasts = self.bundle.forecast(
                [[(rows[s]["image"], d) for s, d in zip(p, days)] for p, days in zip(priors_of, days_of)],
                [ids[i] for i in picks],
                num_samples=self.job.num_samples,
                seed=self.job.seed,
                steps=self.job.inference_steps,
                sampler=self.job.sampler,
                kind=kind,
                voxel_ml=voxel_ml,
                method=self.job.method,
                prior_masks=masks if anchor else None,
            )
            for i, priors, days, target, forecast in zip(picks, priors_of, days_of, targets, forecasts):
                self._write(batch, i, priors, days, rows[target], forecast)
        seconds = (time.perf_counter() - started) / len(ids)
        return {
            "case_id": np.asarray(ids),
            "kind": np.asarray([str(k) for k in batch["kind"]]),
            "seconds": np.full(len(ids), seconds),
            "torch_threads": np.full(len(ids), torch.get_num_threads()),
        }

    def _write(self, batch, i: int, priors: list[str], days: list[float], target: dict, forecast) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from cohortcast.io.atomic import atomic_folder

        case_id, kind = str(batch["case_id"][i]), str(batch["kind"][i])
        true_mask = target.get("mask")
        scalars = {
            "case_id": case_id,
            "patient": str(batch["patient"][i]),
            "kind": kind,
            "target_study": str(batch["target_study"][i]),
            "target_date": str(batch["target_date"][i]),
            "prior_studies": json.dumps(priors),
            "days_before_target": json.dumps(days),
            "priors_used": len(priors),
            "method": self.job.method,
            "seed": self.job.seed,
            "num_samples": self.job.num_samples,
            "inference_steps": self.job.inference_steps,
            "fibrotic_voxels": forecast.fibrotic_voxels,
            "fibrotic_volume_ml": forecast.fibrotic_volume_ml,
            "sample_voxels": None if forecast.sample_voxels is None else json.dumps(forecast.sample_voxels.tolist()),
            "anchored_voxels": forecast.anchored_voxels,
            "target_voxels": None if true_mask is None else int(true_mask.sum()),
            "report": forecast.report,
            "target_report": target["report"] if kind == "radiograph" else None,
        }
        tensors = {"token_mean": forecast.token_mean, "token_variance": forecast.token_variance}
        images = {
            "probability": forecast.probability,
            "probability_variance": forecast.probability_variance,
            "mask": forecast.mask,
            "anchored_mask": forecast.anchored_mask,
            "target_mask": true_mask,
        }
        tensors.update({k: v for k, v in images.items() if v is not None})
        with atomic_folder(self.cases / case_key(case_id), overwrite=True) as tmp:
            table = pa.table(
                {
                    **{k: pa.array([scalars[k]], type=getattr(pa, t)()) for k, t in SCALAR_TYPES.items()},
                    **{k: tensor_column(np.asarray(v)[None]) for k, v in tensors.items()},
                }
            )
            pq.write_table(table, tmp / CASE_FILE)
            if kind == "ct" and self.job.write_nifti:
                _write_nifti_images(tmp, images, target["affine"])


def _voxel_ml(affine) -> float | None:
    """One voxel's volume (mL) on the study grid of `affine` (i, j, k -> LPS mm)."""
    if affine is None:
        return None
    volume = abs(float(np.linalg.det(np.asarray(affine, np.float64)[:3, :3]))) / 1000.0
    return volume if volume > 0 else None


def _write_nifti_images(folder: Path, images: dict[str, np.ndarray | None], affine: np.ndarray) -> None:
    """CT forecasts on the ingested study grid: they overlay the real follow-up."""
    from cohortcast.io.nifti import write_nifti
    from cohortcast.io.volume import Volume

    for name, image in images.items():
        if image is None:
            continue
        dtype = np.float32 if np.asarray(image).dtype.kind == "f" else np.uint8
        write_nifti(Volume(np.asarray(image), np.asarray(affine, np.float64)), folder / f"{name}.nii.gz", dtype=dtype)


def run_cldm_cohort_forecast(job: CLDMForecastJobConfig, start_ray=None) -> dict[str, Any]:
    """Forecast every not-yet-finished case; returns the run summary (also summary.json).
    `start_ray`: called once the inputs are checked, before the Ray Data work (a user
    error is reported without starting Ray)."""
    import pyarrow.dataset as pads
    import ray

    from cohortcast.io.atomic import clear_stale_temps
    from cohortcast.models.cldm_bundle import CLDMBundle

    card_path = Path(job.ingested) / "card.json"
    if not card_path.is_file():
        raise MissingInputError(f"{card_path}: not an ingested cohort (no card.json); run `cohortcast ingest` first")
    card = json.loads(card_path.read_text())
    bundle = CLDMBundle.load(job.model)  # a bad model folder is a clear error before any work
    info = bundle.info()
    check_cohort(info, card, tuple(job.kinds))
    if job.method == "regressor" and not info["regressor"]:
        raise CLDMCohortMismatch(f"cldm.forecast.method: {job.model} holds no regressor/ (the no-diffusion baseline)")
    folder = studies_folder(job.ingested, job.split)
    meta = pads.dataset(str(folder), format="parquet").to_table(columns=META_COLUMNS)
    cases, skipped = make_cases(meta, tuple(job.kinds), int(info["max_priors"]))
    del bundle

    output = Path(job.output)
    (output / "cases").mkdir(parents=True, exist_ok=True)
    check_settings(output, forecast_settings(job, card), "cldm.forecast.output")
    for stale in (output / "cases").glob(".*.tmp-*"):  # an interrupted run's half-written cases
        shutil.rmtree(stale, ignore_errors=True)
    clear_stale_temps(output / "summary.json")
    keys = {case_key(c["case_id"]) for c in cases}
    done = finished_cases(output) & keys
    todo = [c for c in cases if case_key(c["case_id"]) not in done]
    if job.max_cases is not None:
        todo = todo[: job.max_cases]
    log.info("%d CLDM cases in split %r: %d already forecast, %d to do", len(cases), job.split, len(done), len(todo))
    started = time.perf_counter()
    seconds, threads, kinds = [], [], []
    if todo:
        if start_ray is not None:
            start_ray()
        cpus = float(ray.cluster_resources().get("CPU", 1))
        results = (
            ray.data.from_items(todo)
            .map_batches(
                CLDMCaseForecaster,
                fn_constructor_args=(job,),
                batch_size=job.cases_per_batch,
                compute=ray.data.ActorPoolStrategy(size=job.actors),
                batch_format="numpy",
                num_cpus=max(0.1, min(1.0, (cpus - 1.0) / job.actors)),
            )
            .to_pandas()
        )
        seconds = [float(s) for s in results["seconds"]]
        threads, kinds = sorted(set(results["torch_threads"].tolist())), results["kind"].tolist()
    wall = time.perf_counter() - started
    summary = {
        "split": job.split,
        "cases": len(cases),
        "cases_by_kind": {k: sum(c["kind"] == k for c in cases) for k in job.kinds},
        "skipped": skipped,
        "forecast_this_run": len(seconds),
        "forecast_this_run_by_kind": {k: kinds.count(k) for k in job.kinds},
        "finished": len(finished_cases(output) & keys),
        "method": job.method,
        "num_samples": job.num_samples,
        "inference_steps": job.inference_steps,
        "sampler": job.sampler,
        "seed": job.seed,
    }
    return write_summary(output, summary, seconds, threads, wall, "CLDM forecast")


def forecast_cldm_cohort(cfg) -> dict[str, Any]:
    """The CLDM forecasting job for a whole config: paths resolved, Ray started, run."""
    from cohortcast.config.paths import resolve_paths
    from cohortcast.ray_runtime import ensure_ray

    cfg = resolve_paths(cfg)
    return run_cldm_cohort_forecast(cfg.cldm.forecast, start_ray=lambda: ensure_ray(cfg.ray))


def read_cldm_forecasts(output: str | Path):
    """All finished cases as one pyarrow Table per kind: {"ct": Table, "radiograph": Table}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's tensor extension types with pyarrow)

    tables: dict[str, list] = {}
    for path in sorted((Path(output) / "cases").glob(f"[!.]*/{CASE_FILE}")):
        table = pq.read_table(path)
        tables.setdefault(table.column("kind")[0].as_py(), []).append(table)
    # CT cases without an anchored or a true mask lack those columns: filled with nulls
    return {k: pa.concat_tables(v, promote_options="permissive") for k, v in tables.items()}
