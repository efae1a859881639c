"""Cohort-scale batch forecasting on Ray Data (jobs/forecast_cohort.py).

Cases: every (patient, nodule) of a split with at least one follow-up; the forecast
goes from its first exam (baseline crop + EHR) to the date of its first follow-up
(NAMD's T0 -> T1), and the real follow-up crop is kept next to it for evaluation.
An actor pool holds the Forecaster (loaded once per actor); each case gets N seeded
samples (DDIM or DPM-Solver++; seeds from (seed, case id, k): a case's forecast does not depend on its
batch or actor).

Output, one folder per case, written under a temp name and renamed when complete, so a
case is either fully there or absent: reruns skip finished cases and an interrupted run
loses at most the cases in flight.

    OUTPUT/cases/<case key>/forecast.parquet   one row: ids, dates, horizon, label, seed,
                                                baseline, target (real), mean, variance,
                                                samples (N, H, W) - tensors in Arrow's
                                                fixed_shape_tensor type
    OUTPUT/cases/<case key>/{mean,variance,samples}.nii.gz, dicom/   on the source geometry
    OUTPUT/summary.json                          counts of the last run
    OUTPUT/settings.json                         what the cases were forecast with: a
                                                rerun with other settings into the same
                                                folder is refused, never mixed in
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from cohortcast.config.training import ForecastJobConfig
from cohortcast.console import format_duration, format_rate
from cohortcast.errors import CohortcastError, MissingInputError

log = logging.getLogger(__name__)

CASE_FILE = "forecast.parquet"
SETTINGS_FILE = "settings.json"
CASE_FORMAT = 2  # 2: latents (mean, baseline, target), the VAE floor and the follow-up diameter per case


class ForecastSettingsMismatch(CohortcastError, ValueError):
    """The output folder holds cases forecast with other settings."""

    http_status = 409


class PreprocessingMismatch(CohortcastError, ValueError):
    """The ingested cohort's crops are not cut as the Forecaster's training crops were."""

    http_status = 409


def cohort_preprocessing(forecaster: str, card: dict[str, Any]):
    """The crop preprocessing to forecast with: the Forecaster's own, which the ingested
    cohort must match (PreprocessingMismatch otherwise); for a Forecaster saved without
    it (format 2), the cohort's, with a warning."""
    from cohortcast.models.forecaster import read_preprocessing
    from cohortcast.models.preprocessing import CropPreprocessing

    cohort = CropPreprocessing.from_ingest(card["config"])
    model = read_preprocessing(forecaster)
    if model is None:
        log.warning(
            "Forecaster %s carries no crop preprocessing (saved before format 3): assuming the ingested cohort's (%s)",
            forecaster,
            cohort.to_dict(),
        )
        return cohort
    differences = model.differences(cohort)
    if differences:
        raise PreprocessingMismatch(
            f"the Forecaster's training crops and the ingested cohort {card['config'].get('output')} differ "
            f"(Forecaster vs cohort: {'; '.join(differences)}); ingest the cohort with the Forecaster's settings "
            "(`cohortcast forecast` over a manifest does this) or forecast with a matching Forecaster"
        )
    return model


def ingest_for_forecaster(ingest, forecaster: str):
    """The ingest config with the Forecaster's crop preprocessing (unchanged for a
    Forecaster saved without it): a cohort ingested for forecasting is cut as the model's
    training crops were, whatever the config's ingest section says."""
    from cohortcast.models.forecaster import read_preprocessing

    model = read_preprocessing(forecaster)
    if model is None:
        return ingest
    from cohortcast.models.preprocessing import CropPreprocessing

    differences = CropPreprocessing.from_ingest(ingest).differences(model)
    if differences:
        log.info(
            "ingesting with the Forecaster's crop preprocessing (config vs Forecaster: %s)", "; ".join(differences)
        )
    return model.applied_to(ingest)


def forecast_settings(job: ForecastJobConfig, card: dict[str, Any]) -> dict[str, Any]:
    """Everything a finished case depends on: the Forecaster (its stage key when it was
    trained by train_namd), sampling settings, the split and the ingested data."""
    from cohortcast.io.stage_outputs import read_marker

    marker = read_marker(job.forecaster) or {}
    return {
        "case_format": CASE_FORMAT,
        "forecaster": str(job.forecaster),
        "forecaster_key": marker.get("key"),
        "split": job.split,
        "num_samples": job.num_samples,
        "inference_steps": job.inference_steps,
        "seed": job.seed,
        "guidance_scale": job.guidance_scale,
        "ingest_fingerprint": card.get("fingerprint"),
        # Only when set: folders finished before samplers were selectable stay resumable.
        **({"sampler": job.sampler} if job.sampler else {}),
    }


def check_settings(output: Path, settings: dict[str, Any], output_setting: str = "forecast.output") -> None:
    """Record `settings` in OUTPUT/settings.json; refuse (ForecastSettingsMismatch) when
    the folder's finished cases were made with others."""
    from cohortcast.io.atomic import write_text_atomic

    path = output / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed and finished_cases(output):
            diff = ", ".join(_change(k, before.get(k), settings[k]) for k in changed)
            raise ForecastSettingsMismatch(
                f"{output} holds forecasts made with other settings ({diff}); forecast "
                f"into another {output_setting} or delete it"
            )
    write_text_atomic(path, json.dumps(settings, indent=2))


def _change(key: str, before: Any, now: Any) -> str:
    if isinstance(before, dict) or isinstance(now, dict):  # e.g. digests of a model's files
        return f"{key} changed"
    return f"{key}: {before!r} -> {now!r}"


def write_summary(
    output: Path,
    summary: dict[str, Any],
    seconds: list[float],
    threads: list,
    wall: float,
    what: str,
    phases: dict[str, float] | None = None,
) -> dict:
    """`summary` + the run's throughput -> OUTPUT/summary.json and one log line;
    `phases`: where the time went (seconds), recorded and logged as given."""
    from cohortcast.io.atomic import write_text_atomic

    samples = summary["num_samples"]
    summary = {
        **summary,
        "wall_seconds": wall,
        "cases_per_s": len(seconds) / wall if seconds else 0.0,
        "samples_per_s": len(seconds) * samples / wall if seconds else 0.0,
        # time inside the actors (model + writes) per case: against wall * actors / cases
        # it tells a slow model from a starved pipeline
        "actor_seconds_per_case": float(np.mean(seconds)) if seconds else 0.0,
        "actor_torch_threads": threads,
        **(phases or {}),
    }
    write_text_atomic(output / "summary.json", json.dumps(summary, indent=2))
    if phases:
        log.info("%s time: %s", what, ", ".join(f"{k} {v:.3g}" for k, v in phases.items()))
    log.info(
        "%s: %d cases in %s (%s cases/s, %s samples/s); %d of %d finished in %s",
        what,
        len(seconds),
        format_duration(wall),
        format_rate(summary["cases_per_s"]),
        format_rate(summary["samples_per_s"]),
        summary["finished"],
        summary["cases"],
        output,
    )
    return summary


def case_key(case_id: str) -> str:
    return hashlib.sha256(case_id.encode()).hexdigest()[:20]


def make_case(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data map_groups: one nodule's rows -> its (first exam -> first follow-up) case."""
    from cohortcast.data.manifest import EHR_FEATURES, plain_value

    order = np.argsort(np.asarray(group["days_since_baseline"]), kind="stable")
    b, t = order[0], order[min(1, len(order) - 1)]
    case_id = f"{group['patient'][b]}/{group['nodule_id'][b]}"
    centre = [float(group[f"center_{a}_mm"][b]) for a in "xyz"]
    row = {
        "case_id": np.asarray([case_id]),
        "patient": np.asarray([group["patient"][b]]),
        "nodule_id": np.asarray([group["nodule_id"][b]]),
        "baseline_study": np.asarray([group["study"][b]]),
        "target_study": np.asarray([group["study"][t]]),
        "baseline_date": np.asarray([str(group["study_date"][b])]),
        "target_date": np.asarray([str(group["study_date"][t])]),
        "horizon_days": np.asarray([float(group["days_since_baseline"][t] - group["days_since_baseline"][b])]),
        "malignant": np.asarray([int(np.max(group["malignant"]))]),
        "ehr_json": np.asarray([json.dumps({k: plain_value(group[k][b]) for k in EHR_FEATURES})]),
        "centre_lps": np.asarray([centre], np.float64),
        # The baseline crop's grid, as ingestion cut it; NaN for cohorts ingested before
        # crops carried one (CaseForecaster then falls back to the axial grid).
        "crop_affine": (
            np.asarray(group["crop_affine"][b], np.float64).reshape(1, 16)
            if "crop_affine" in group
            else np.full((1, 16), np.nan)
        ),
        # the follow-up's nodule size: the evaluation's nodule-region MAE is measured on it
        "target_diameter_mm": np.asarray([float(group["SCT_LONG_DIA"][t] or 0.0)], np.float32),
        "baseline": np.asarray(group["crop"], np.float32)[b][None],
        "target": np.asarray(group["crop"], np.float32)[t][None],
    }
    # A nodule seen once has nothing to forecast against: same columns, no row.
    return row if len(order) >= 2 else {k: v[:0] for k, v in row.items()}


def case_grid(crop_affine, centre_lps, size: int, spacing_mm: float) -> np.ndarray:
    """The baseline crop's own affine; for a cohort ingested before crops kept one (NaN
    from make_case), the axial grid around the centre: right for CT, wrong for
    radiographs (case_dataset says so once)."""
    from cohortcast.io.crop import axial_grid_affine

    affine = np.asarray(crop_affine, np.float64).reshape(4, 4)
    return affine if np.isfinite(affine).all() else axial_grid_affine(centre_lps, size, spacing_mm)


def tensor_column(array: np.ndarray):
    import pyarrow as pa

    # A fresh C-order copy: views such as x[None] are "contiguous" with a 0 stride on the
    # new axis, which Arrow's tensor extension rejects.
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.array(array, order="C", copy=True))


class CaseForecaster:
    """Ray Data actor: a batch of cases -> forecasts written to per-case folders."""

    def __init__(self, forecaster: str, job: ForecastJobConfig, ingest_card: dict[str, Any], llm_path: str | None):
        from cohortcast.models.forecaster import Forecaster

        started = time.perf_counter()
        self.model = Forecaster.load(forecaster, llm_path=llm_path)
        self.load_seconds = time.perf_counter() - started
        self.job, self.cases = job, Path(job.output) / "cases"
        # The model's preprocessing (run_cohort_forecast checked the cohort matches it).
        geometry = cohort_preprocessing(forecaster, ingest_card)
        self.hu_window, self.normalise = geometry.hu_window, geometry.normalise
        self.spacing = geometry.crop_spacing_mm

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Forecast and write the batch's cases; one row per case back: `seconds` (this
        actor's time per case, NaN for a case it found written), its split into sampling
        (the Forecaster and the follow-up's VAE reference) and writing, the actor's
        model-load time and its node."""
        import ray
        import torch

        ids = [str(c) for c in batch["case_id"]]
        # A batch Ray Data retries (its actor was lost with its node, or its output was)
        # may find some of its cases written by the attempt that was lost: those stand,
        # since this run's settings are the folder's (check_settings), and only the rest
        # is forecast. A case is thus written once, whatever retries its batch had.
        todo = [i for i, case_id in enumerate(ids) if not (self.cases / case_key(case_id) / CASE_FILE).is_file()]
        seconds, model_seconds = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
        if todo:
            started = time.perf_counter()
            model = self._forecast(
                batch if len(todo) == len(ids) else {k: np.asarray(v)[todo] for k, v in batch.items()}
            )
            seconds[todo] = (time.perf_counter() - started) / len(todo)
            model_seconds[todo] = model / len(todo)
        node = ray.get_runtime_context().get_node_id()
        return {
            "case_id": np.asarray(ids),
            "seconds": seconds,
            "model_seconds": model_seconds,
            "load_seconds": np.full(len(ids), self.load_seconds),
            "torch_threads": np.full(len(ids), torch.get_num_threads()),
            "node_id": np.asarray([node if np.isfinite(s) else "" for s in seconds]),
        }

    def _forecast(self, batch: dict[str, np.ndarray]) -> float:
        """Forecast and write the batch; returns the seconds spent in the models (the rest
        of the batch's time is writing)."""
        import torch

        started = time.perf_counter()
        ids = [str(c) for c in batch["case_id"]]
        records = [json.loads(str(t)) for t in batch["ehr_json"]] if self.model.conditioner is not None else None
        # np.array, not asarray: a copy, since the batch's arrays are read-only views of
        # Ray Data's blocks (torch warns on those).
        forecast = self.model.forecast(
            torch.from_numpy(np.array(batch["baseline"], np.float32))[:, None],
            torch.from_numpy(np.array(batch["horizon_days"], np.float32)),
            ids,
            ehr=records,
            num_samples=self.job.num_samples,
            seed=self.job.seed,
            steps=self.job.inference_steps,
            guidance_scale=self.job.guidance_scale,
            sampler=self.job.sampler,
        )
        # For the evaluation's latent error and VAE floor: the real follow-up through the
        # same VAE (its latent, and that latent decoded).
        target = torch.from_numpy(np.array(batch["target"], np.float32))[:, None]
        target_latent = self.model.vae.encode_for_diffusion(target)
        floor = self.model.vae.decode_from_diffusion(target_latent)
        latents = {
            "mean_latent": forecast.latents.mean(1).numpy(),
            "baseline_latent": forecast.baseline_latent.numpy(),
            "target_latent": target_latent.numpy(),
            "target_reconstruction": floor[:, 0].numpy(),
        }
        model_seconds = time.perf_counter() - started
        for i, case_id in enumerate(ids):
            self._write(
                batch,
                i,
                case_id,
                forecast.mean[i, 0].numpy(),
                forecast.variance[i, 0].numpy(),
                forecast.samples[i, :, 0].numpy(),
                {k: v[i] for k, v in latents.items()},
            )
        return model_seconds

    def _write(self, batch, i: int, case_id: str, mean, variance, samples, extra: dict[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from cohortcast.inference.forecast_outputs import to_hu, write_case_images
        from cohortcast.io.atomic import atomic_folder

        key = case_key(case_id)
        with atomic_folder(self.cases / key, overwrite=True) as tmp:
            scalars = {
                k: [batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]]
                for k in (
                    "case_id",
                    "patient",
                    "nodule_id",
                    "baseline_study",
                    "target_study",
                    "baseline_date",
                    "target_date",
                    "horizon_days",
                    "malignant",
                    "target_diameter_mm",
                )
            }
            table = pa.table(
                {
                    **scalars,
                    "seed": [self.job.seed],
                    "num_samples": [self.job.num_samples],
                    "inference_steps": [self.job.inference_steps],
                    "sampler": [self.job.sampler or self.model.cfg.scheduler.sampler],
                    "baseline": tensor_column(np.asarray(batch["baseline"][i : i + 1], np.float32)),
                    "target": tensor_column(np.asarray(batch["target"][i : i + 1], np.float32)),
                    "mean": tensor_column(mean[None]),
                    "variance": tensor_column(variance[None]),
                    "samples": tensor_column(samples[None]),
                    **{k: tensor_column(v[None]) for k, v in extra.items()},
                }
            )
            pq.write_table(table, tmp / CASE_FILE)
            grid = case_grid(batch["crop_affine"][i], batch["centre_lps"][i], mean.shape[-1], self.spacing)
            write_case_images(
                tmp,
                to_hu(mean, self.hu_window, self.normalise),
                variance,
                to_hu(samples, self.hu_window, self.normalise),
                grid,
                str(batch["patient"][i]),
                key,
                dt.date.fromisoformat(str(batch["target_date"][i])[:10]),
                dicom=self.job.write_dicom,
            )


def finished_cases(output: str | Path) -> set[str]:
    """Case keys whose folder is complete (temp folders start with '.')."""
    cases = Path(output) / "cases"
    if not cases.is_dir():
        return set()
    return {p.name for p in cases.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CASE_FILE).is_file()}


def read_cases(ingested: str | Path, split: str) -> dict[str, np.ndarray]:
    """The split's cases as numpy columns, one row per (patient, nodule) with a follow-up
    (make_case on each nodule's rows). Built on the driver from the nodules table
    (pyarrow, without the patches): a case row is two crops and a few ids, and the Ray
    Data groupby this replaced took 14-18 s on 2 cores against 0.2 s for 579 cases. The
    driver holds the split's crops once (an NLST-sized cohort's 75k crops at 64x64: 1.2
    GB; a 40% test split 0.5 GB)."""
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  registers Ray Data's tensor type, in which ingestion wrote the crops
    from ray.data.block import BlockAccessor

    folder = Path(ingested) / "nodules" / f"split={split}"
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: the ingested cohort has no {split!r} split")
    dataset = pads.dataset(str(folder), format="parquet")
    names = [n for n in dataset.schema.names if n != "patch"]
    if "crop_affine" not in names:
        log.warning(
            "%s was ingested before crops kept their affine: forecast images are written on the axial "
            "grid around each centre, which is wrong for radiographs and other single-plane images; "
            "re-ingest (ingest.overwrite) to write them on the crops' own grids",
            ingested,
        )
    # Ray Data's own table -> numpy conversion: make_case sees what a map_groups batch holds.
    table = dataset.to_table(columns=names)
    if table.num_rows == 0:  # a split folder without rows (or files): nothing to forecast
        return {"case_id": np.asarray([], str)}
    rows = BlockAccessor.for_block(table).to_numpy()
    patient, nodule = rows["patient"].astype(str), rows["nodule_id"].astype(str)
    order = np.lexsort((nodule, patient))
    boundaries = np.flatnonzero((patient[order][1:] != patient[order][:-1]) | (nodule[order][1:] != nodule[order][:-1]))
    # make_case gives a nodule seen once the columns without a row, so these concatenate.
    cases = [make_case({k: v[group] for k, v in rows.items()}) for group in np.split(order, boundaries + 1)]
    return {k: np.concatenate([c[k] for c in cases]) for k in cases[0]}


def case_blocks(cases: dict[str, np.ndarray], rows: np.ndarray, cases_per_batch: int, actors: int):
    """The `rows` of `cases` as a Ray Data dataset in blocks of whole batches, ~16 a pool
    actor: small enough to balance the pool and to redo little when a node is lost."""
    import math

    import ray.data

    blocks = max(1, min(math.ceil(len(rows) / cases_per_batch), 16 * actors))
    # Scalars as Python values: a numpy string scalar would become a fixed-width Arrow
    # type per block (its own length), and blocks of other widths then fail to combine.
    items = [{k: v[i].item() if v.ndim == 1 else v[i] for k, v in cases.items()} for i in rows]
    return ray.data.from_items(items, override_num_blocks=blocks)


def run_cohort_forecast(job: ForecastJobConfig, llm_path: str | None = None) -> dict[str, Any]:
    """Forecast every not-yet-finished case; returns the run summary (also summary.json)."""
    import ray

    from cohortcast.io.atomic import clear_stale_temps

    card = json.loads((Path(job.ingested) / "card.json").read_text())
    cohort_preprocessing(job.forecaster, card)  # before any work: a mismatch is a clear error
    output = Path(job.output)
    (output / "cases").mkdir(parents=True, exist_ok=True)
    check_settings(output, forecast_settings(job, card))
    for stale in (output / "cases").glob(".*.tmp-*"):  # an interrupted run's half-written cases
        shutil.rmtree(stale, ignore_errors=True)
    clear_stale_temps(output / "summary.json")
    preparing = time.perf_counter()
    cases = read_cases(job.ingested, job.split)
    keys = [case_key(str(c)) for c in cases["case_id"]]
    done = finished_cases(output) & set(keys)
    pending = np.asarray([i for i, key in enumerate(keys) if key not in done], np.int64)
    if job.max_cases is not None:
        pending = pending[: job.max_cases]
    log.info("%d cases in split %r: %d already forecast, %d to do", len(keys), job.split, len(done), len(pending))
    started = time.perf_counter()
    phases = {"prepare_seconds": started - preparing}
    seconds, threads, nodes, found = [], [], set(), 0
    if len(pending):
        cpus = float(ray.cluster_resources().get("CPU", 1))
        results = case_blocks(cases, pending, job.cases_per_batch, job.actors).map_batches(
            CaseForecaster,
            fn_constructor_args=(job.forecaster, job, card, llm_path),
            batch_size=job.cases_per_batch,
            compute=ray.data.ActorPoolStrategy(size=job.actors),
            batch_format="numpy",
            # leave a CPU for the driver and Ray Data's own tasks (the cases are in the object store)
            num_cpus=max(0.1, min(1.0, (cpus - 1.0) / job.actors)),
            # Cohort forecasting relies on Ray Data's actor defaults (DataContext's SPREAD
            # scheduling, max_restarts=-1, max_task_retries=-1; not restated, since passing
            # them is a deprecated ray_remote_args): actors spread over the cluster's nodes,
            # and an actor lost with its node is restarted on another and its unfinished
            # batches retried there (a retried case rewrites only its own folder, under a
            # temp name). Tested on a 3-node cluster.
        )
        results = results.to_pandas()
        forecast_here = results[results["seconds"].notna()]
        seconds, threads = [float(s) for s in forecast_here["seconds"]], sorted(set(results["torch_threads"].tolist()))
        nodes, found = set(forecast_here["node_id"]), len(results) - len(forecast_here)
        if len(forecast_here):
            model = float(forecast_here["model_seconds"].mean())
            phases.update(
                # the slowest actor's Forecaster load: the pool waits for it once per run
                actor_load_seconds=float(results["load_seconds"].max()),
                model_seconds_per_case=model,
                write_seconds_per_case=float(np.mean(seconds)) - model,
            )
        # An actor lost mid-case (its node went away) leaves that case's temp folder; the
        # case itself was retried elsewhere, so the temp is garbage now.
        for stale in (output / "cases").glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    wall = time.perf_counter() - started
    finished = finished_cases(output)
    summary = {
        "split": job.split,
        "cases": len(keys),
        "forecast_this_run": len(seconds) + found,
        # cases a retried batch found written by its lost attempt (a node gone mid-job)
        "found_on_retry": found,
        "finished": len(finished & set(keys)),
        "num_samples": job.num_samples,
        "inference_steps": job.inference_steps,
        "sampler": job.sampler,
        "seed": job.seed,
        "actor_nodes": len(nodes),  # nodes whose actors forecast this run's cases
    }
    return write_summary(output, summary, seconds, threads, wall, "forecast", phases)


def forecast_cohort(cfg) -> dict[str, Any]:
    """The forecasting job for a whole config: paths resolved, Ray started, `forecast` run.
    Over a manifest: when `forecast.ingested` is the config's `ingest.output` and the
    manifest exists, the cohort is ingested first (reused when up to date), its crops cut
    with the Forecaster's own preprocessing."""
    from cohortcast.config.paths import resolve_paths
    from cohortcast.ray_runtime import ensure_ray

    cfg = resolve_paths(cfg)
    ensure_ray(cfg.ray)
    if cfg.forecast.ingested == cfg.ingest.output and Path(cfg.ingest.manifest).exists():
        from cohortcast.data.ingest import run_ingest

        run_ingest(ingest_for_forecaster(cfg.ingest, cfg.forecast.forecaster), cfg.privacy, cfg.ray)
    return run_cohort_forecast(cfg.forecast, llm_path=cfg.model.conditioner.llm_path)


def read_forecasts(output: str | Path):
    """All finished cases as one pyarrow Table (tensor columns as fixed_shape_tensor)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(output) / "cases").glob(f"[!.]*/{CASE_FILE}"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None
