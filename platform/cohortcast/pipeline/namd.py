"""The NAMD training job: cohort -> ingest -> (a) VAE -> (b) latent cache -> (c)
unconditional LDM -> (d) conditional LDM -> Forecaster, all in one MLflow parent run.

Each stage is skipped when its valid output exists and resumes from its latest Ray
Train checkpoint when it was interrupted (training.stage_runner, io.stage_outputs)."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cohortcast.config import flatten
from cohortcast.config.paths import resolve_paths
from cohortcast.config.schema import CohortcastConfig
from cohortcast.io import stage_outputs as outputs
from cohortcast.training.stage_runner import StageReport, StageRunner, format_stages

log = logging.getLogger(__name__)


@dataclass
class NAMDReport:
    stages: list[StageReport]
    forecaster: str | None
    mlflow: str
    parent_run_id: str | None


def without_pretrained(model_cfg):
    """A copy that builds the architecture only: weights come from our own stage outputs."""
    cfg = copy.deepcopy(model_cfg)
    cfg.vae.pretrained_path = None
    cfg.denoiser.pretrained_path = None
    return cfg


class NAMDJob:
    def __init__(self, cfg: CohortcastConfig, train_callbacks: list | None = None):
        """`train_callbacks` go into every stage's Ray Train RunConfig (a sweep trial
        passes Tune's TuneReportCallback)."""
        self.cfg = cfg
        self.output = Path(cfg.training.output)
        self.runner = StageRunner(self.output, cfg.training.scaling, cfg.training.stages, train_callbacks)

    @property
    def reports(self) -> list[StageReport]:
        return self.runner.reports

    # ----- the stages ---------------------------------------------------------------
    def stage_vae(self, runs, card: dict) -> Path:
        from cohortcast.training.vae_stage import vae_dataset, vae_worker_loop

        t, m = self.cfg.training, self.cfg.model
        key = outputs.stage_key("vae", t.vae, m.vae, card["fingerprint"], t.scaling.num_workers)
        ingested = card["config"]["output"]

        def export(checkpoint, folder: Path) -> None:
            from cohortcast.models.vae import NoduleVAE, save_vae
            from cohortcast.training.export import consolidated_state_dict
            from cohortcast.training.vae_stage import scaling_factor_from_crops

            vae = NoduleVAE(without_pretrained(m).vae)
            vae.load_state_dict(consolidated_state_dict(checkpoint))
            if m.vae.scaling_factor is None:  # unit-variance diffusion latents (VAEConfig)
                vae.set_scaling_factor(scaling_factor_from_crops(vae, ingested))
                log.info(
                    "VAE latent scaling factor %.4f (1 / std of the train split's posterior means)", vae.scaling_factor
                )
            save_vae(vae, folder)

        return self.runner.train(
            runs,
            "vae",
            key,
            vae_worker_loop,
            {"stage": t.vae, "model": m.vae, "validation": t.validation},
            lambda: {
                split: vae_dataset(ingested, split, m.vae.loss.diameter_scale_mm, t.scaling.data_cpus)
                for split in ("train", "val")
            },
            export,
            flatten(t.vae, "training.vae") | flatten(m.vae, "model.vae"),
        )

    def stage_latents(self, runs, card: dict, vae_folder: Path) -> dict:
        from cohortcast.inference.latent_cache import build_latent_cache

        c = self.cfg.training.latent_cache
        run_id = runs.start_child("latents", flatten(c, "training.latent_cache"))
        started = time.perf_counter()
        cache = build_latent_cache(
            card["config"]["output"],
            vae_folder,
            c.root,
            actors=c.actors,
            batch_size=c.batch_size,
            use_gpu=self.cfg.training.scaling.use_gpu,
        )
        runs.log_dict(run_id, {k: v for k, v in cache.items() if k != "reused"}, "latent_card.json")
        self.runner.report(
            runs,
            run_id,
            StageReport(
                "latents",
                "up to date" if cache["reused"] else "built",
                cache["path"],
                time.perf_counter() - started,
                metrics={"rows": cache["rows"]},
            ),
        )
        return cache

    def stage_ldm_uncond(self, runs, cache: dict) -> Path:
        from cohortcast.training.ldm_stage import DENOISER_FILE, latent_dataset, ldm_unconditional_worker_loop

        t, m = self.cfg.training, self.cfg.model
        key = outputs.stage_key(
            "ldm_uncond", t.ldm_uncond, m.vae, m.denoiser, m.scheduler, cache["key"], t.scaling.num_workers
        )

        def export(checkpoint, folder: Path) -> None:
            from safetensors.torch import save_file

            from cohortcast.io.atomic import atomic_folder
            from cohortcast.training.export import consolidated_state_dict

            state = consolidated_state_dict(checkpoint)
            with atomic_folder(folder, overwrite=True) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / DENOISER_FILE))

        return self.runner.train(
            runs,
            "ldm_uncond",
            key,
            ldm_unconditional_worker_loop,
            {"stage": t.ldm_uncond, "model": m, "validation": t.validation},
            lambda: {split: latent_dataset(cache["path"], split, t.scaling.data_cpus) for split in ("train", "val")},
            export,
            flatten(t.ldm_uncond, "training.ldm_uncond") | flatten(m.denoiser, "model.denoiser"),
        )

    def training_preprocessing(self, cache: dict):
        """The crop preprocessing of the cohort the latent cache was encoded from: its
        ingest card, else (a cache card without the cohort's path) this job's ingest config."""
        from cohortcast.models.preprocessing import CropPreprocessing

        ingested = cache.get("ingested")
        if ingested and (Path(ingested) / "card.json").is_file():
            return CropPreprocessing.from_ingested(ingested)
        log.warning(
            "latent cache %s names no ingested cohort card: recording the Forecaster's crop preprocessing "
            "from the config's ingest section",
            cache.get("path"),
        )
        return CropPreprocessing.from_ingest(self.cfg.ingest)

    def ldm_cond_key(self, cache: dict, denoiser_folder: Path, name: str = "ldm_cond") -> str:
        t, m = self.cfg.training, self.cfg.model
        uncond_key = outputs.read_marker(denoiser_folder)["key"]
        stage = t.regressor if name == "regressor" else t.ldm_cond
        # validation is in the key: it picks which weights are exported (best latent error)
        return outputs.stage_key(
            name, stage, m, t.task_loss, t.task_weight, t.validation, cache["key"], uncond_key, t.scaling.num_workers
        )

    def stage_ldm_cond(
        self,
        runs,
        cache: dict,
        vae_folder: Path,
        denoiser_folder: Path,
        datasets: dict | None = None,
        name: str = "ldm_cond",
    ) -> Path:
        """`datasets`: prebuilt {"train", "val"} trajectory datasets (a sweep builds them
        once for all its trials); None = built here from the cache. `name` "regressor"
        trains the no-diffusion baseline (ForecasterConfig.kind "regression") the same way,
        from the same stage-c weights and data, with `training.regressor`'s settings."""
        from cohortcast.training.ldm_conditional_stage import build_conditional_forecaster, ldm_conditional_worker_loop

        t, m = self.cfg.training, self.cfg.model
        key = self.ldm_cond_key(cache, denoiser_folder, name)
        stage = t.regressor if name == "regressor" else t.ldm_cond
        model = without_pretrained(m)
        model.kind = "regression" if name == "regressor" else m.kind
        built: dict = {}

        def data() -> dict:
            built.update(datasets or trajectory_datasets(cache, m.temporal.max_exams, t.scaling.data_cpus))
            if model.denoiser.target == "change" and model.denoiser.change_scale is None:
                model.denoiser.change_scale = change_scale(built["train"])
                log.info("change scale %.4f (1 / std of the train split's latent changes)", model.denoiser.change_scale)
            return built

        def export(checkpoint, folder: Path) -> None:
            from cohortcast.training.export import consolidated_state_dict

            forecaster = build_conditional_forecaster(model, vae_folder, None)
            state = {k.removeprefix("forecaster."): v for k, v in consolidated_state_dict(checkpoint).items()}
            missing, unexpected = forecaster.load_state_dict(state, strict=False)
            wrong = [k for k in missing if not k.startswith("vae.")] + list(unexpected)  # frozen VAE: from stage a
            if wrong:
                raise RuntimeError(f"stage-d checkpoint does not fit the Forecaster: {wrong[:5]}")
            # Serving and cohort forecasting cut their crops as the training crops were cut.
            forecaster.preprocessing = self.training_preprocessing(cache)
            forecaster.save(folder)

        loop_config = {
            "stage": stage,
            "model": model,
            "vae_folder": str(vae_folder),
            "denoiser_folder": str(denoiser_folder),
            "task_loss": t.task_loss,
            "task_weight": t.task_weight,
            "validation": t.validation,
            "best_path": str(best_weights_path(t.scaling.storage_path, self.output, f"{name}-{key}")),
        }
        return self.runner.train(
            runs,
            name,
            key,
            ldm_conditional_worker_loop,
            loop_config,
            data,
            export,
            flatten(stage, f"training.{name}")
            | {"training.task_loss": t.task_loss, "training.task_weight": t.task_weight},
            best=loop_config["best_path"],
        )


BEST_WEIGHTS = "best_validation.safetensors"


def best_weights_path(storage_path: str, output: Path, run_name: str) -> Path:
    """Where stage d's rank 0 keeps the best validation weights (plain file writes):
    beside the Ray Train run under a local or mounted `storage_path`; under
    `training.output` (which every node sees as well) when `storage_path` is a URI such
    as s3://, which a file write cannot open."""
    from cohortcast.training.runner import is_uri, storage_location

    if is_uri(storage_path):
        return Path(output) / f"{run_name}.{BEST_WEIGHTS}"
    return Path(storage_location(storage_path)) / run_name / BEST_WEIGHTS


def change_scale(trajectories) -> float:
    """1 / std of the latent change between consecutive exams over a trajectory dataset
    (every orientation), so the generated change has unit variance like the latents."""
    import numpy as np

    count, total, total_sq = 0, 0.0, 0.0
    for batch in trajectories.iter_batches(batch_size=256, batch_format="numpy"):
        latents, n = np.asarray(batch["latents"], np.float64), np.asarray(batch["num_exams"])
        for row, exams in zip(latents, n):
            change = row[1:exams] - row[: exams - 1]
            count += change.size
            total += change.sum()
            total_sq += (change * change).sum()
    if count == 0:
        raise ValueError("no trajectory with a follow-up in the train split: cannot scale the change")
    variance = total_sq / count - (total / count) ** 2
    if not variance > 0:
        raise ValueError("every training change is the same: cannot scale it")
    return float(1.0 / variance**0.5)


def trajectory_datasets(cache: dict, max_exams: int, data_cpus: float = 0.5) -> dict:
    """The conditional stage's {"train", "val"} datasets from a latent cache."""
    from cohortcast.training.trajectories import trajectory_dataset

    datasets = {split: trajectory_dataset(cache["path"], split, max_exams, data_cpus) for split in ("train", "val")}
    if datasets["train"] is None:
        raise ValueError(f"{cache['path']}: no trajectory with a follow-up in the train split: nothing to train on")
    return datasets


def run_namd(cfg: CohortcastConfig) -> NAMDReport:
    from cohortcast.data.prepare import prepare_cohort
    from cohortcast.pipeline.tiny_llm_setup import ensure_debug_llm
    from cohortcast.ray_runtime import ensure_ray
    from cohortcast.tracking.job_runs import JobRuns, card_summary

    cfg = resolve_paths(cfg)
    ensure_ray(cfg.ray)
    job = NAMDJob(cfg)
    with JobRuns(cfg) as runs:
        card = prepare_cohort(cfg)
        runs.log_dict(runs.parent_id, card_summary(card), "dataset/ingest_card.json")
        ensure_debug_llm(cfg, card)
        vae = job.stage_vae(runs, card)
        cache = job.stage_latents(runs, card, vae)
        forecaster = None
        if {"ldm_uncond", "ldm_cond", "regressor"} & set(cfg.training.stages):
            denoiser = job.stage_ldm_uncond(runs, cache)
            if "ldm_cond" in cfg.training.stages:
                forecaster = job.stage_ldm_cond(runs, cache, vae, denoiser)
            if "regressor" in cfg.training.stages:
                job.stage_ldm_cond(runs, cache, vae, denoiser, name="regressor")
        if forecaster is not None and runs.enabled:
            from cohortcast.tracking.forecaster_pyfunc import log_forecaster

            trained = next(r for r in job.reports if r.name == "ldm_cond").status == "trained"
            if trained:
                log_forecaster(str(forecaster), cfg.mlflow.registry_name, cfg.mlflow.registry_alias)
            runs.client.set_tag(runs.parent_id, "cohortcast.forecaster", str(forecaster))
        return NAMDReport(job.reports, str(forecaster) if forecaster else None, runs.location(), runs.parent_id)


def format_report(report: NAMDReport) -> str:
    lines = ["NAMD job summary", *format_stages(report.stages)]
    if report.forecaster:
        lines.append(f"Forecaster: {report.forecaster}")
    lines.append(report.mlflow)
    return "\n".join(lines)
