"""The CLDM job, part 1 (jobs/train_cldm.py, `cohortcast train-cldm`): cohort -> ingest
-> universal encoder pre-training (masked-image modelling on CT volumes and chest
radiographs, Ray Train + DeepSpeed) -> study latent cache (Ray Data actor pool), all in
one MLflow parent run with one child run per stage.

As in the NAMD job, a stage is skipped when its valid output exists (io.stage_outputs)
and resumes from its latest Ray Train checkpoint when it was interrupted; the cache is
reused while the encoder and the ingested data are the ones it was built from."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cohortcast.config import flatten
from cohortcast.config.cldm import CLDM_STAGES, EncoderConfig
from cohortcast.config.loader import ConfigError
from cohortcast.config.paths import resolve_paths
from cohortcast.config.schema import CohortcastConfig
from cohortcast.io import stage_outputs as outputs
from cohortcast.training.stage_runner import StageReport, StageRunner, format_stages

log = logging.getLogger(__name__)


@dataclass
class CLDMOutputs:
    """Where the job's stages put their results (None: the stage is not in
    `cldm.training.stages` and has no output). Folders under `cldm.training.output`:
    encoder/ (UniversalEncoder), segmentation/ (SegmentationDecoder), report/
    (ReportDecoder, with its LM), diffusion/ (CLDMForecaster), regressor/ (StudyRegressor);
    `latents` is the study latent cache folder (latents-<key>/)."""

    encoder: Path
    latents: Path | None = None
    segmentation: Path | None = None
    report: Path | None = None
    diffusion: Path | None = None
    regressor: Path | None = None


@dataclass
class CLDMReport:
    stages: list[StageReport]
    outputs: CLDMOutputs
    mlflow: str
    parent_run_id: str | None


def without_pretrained(encoder: EncoderConfig) -> EncoderConfig:
    """A copy that builds the architecture only: the weights come from our own stage output."""
    cfg = copy.deepcopy(encoder)
    cfg.pretrained_path = None
    return cfg


def check_ingested_shapes(encoder: EncoderConfig, card: dict) -> None:
    """The ingested volumes and radiographs must tile into the encoder's patches and be
    the encoder's sizes (the part-2 models' token grids come from those): say so before
    any training starts, naming the settings to change."""
    tables = card.get("tables", {}).get("studies", {})
    for name, patch, size, setting in (
        ("volume", encoder.patch_3d, encoder.volume_3d, "ingest.volume_shape"),
        ("radiograph", encoder.patch_2d, encoder.image_2d, "ingest.radiograph_size"),
    ):
        shape = tables.get(name)
        if shape and any(s % p or s < p for s, p in zip(shape, patch)):
            patch_setting = "cldm.encoder.patch_3d" if name == "volume" else "cldm.encoder.patch_2d"
            raise ConfigError(
                f"{setting}: the ingested {name}s are {list(shape)}, not a multiple of the encoder's patch "
                f"{list(patch)} on every axis ({patch_setting})"
            )
        if shape and tuple(shape) != tuple(size):
            size_setting = "cldm.encoder.volume_3d" if name == "volume" else "cldm.encoder.image_2d"
            raise ConfigError(
                f"{setting}: the ingested {name}s are {list(shape)} but {size_setting} is {list(size)}; the "
                "CLDM models' token grids follow the encoder's sizes, so set them equal"
            )


class CLDMJob:
    def __init__(self, cfg: CohortcastConfig, train_callbacks: list | None = None):
        self.cfg = cfg
        t = cfg.cldm.training
        self.runner = StageRunner(
            t.output,
            cfg.training.scaling,
            t.stages,
            train_callbacks,
            known=CLDM_STAGES,
            stages_setting="cldm.training.stages",
        )

    @property
    def reports(self) -> list[StageReport]:
        return self.runner.reports

    def encoder_key(self, card: dict) -> str:
        t, scaling = self.cfg.cldm.training, self.cfg.training.scaling
        return outputs.stage_key("encoder", t.encoder, self.cfg.cldm.encoder, card["fingerprint"], scaling.num_workers)

    def stage_encoder(self, runs, card: dict) -> Path:
        from cohortcast.training.encoder_stage import encoder_datasets, encoder_worker_loop

        t, encoder = self.cfg.cldm.training, self.cfg.cldm.encoder
        ingested = card["config"]["output"]
        workers = self.cfg.training.scaling.num_workers

        def export(checkpoint, folder: Path) -> None:
            from cohortcast.models.universal_encoder import UniversalEncoder
            from cohortcast.training.export import consolidated_state_dict

            model = UniversalEncoder(without_pretrained(encoder))
            model.load_state_dict(consolidated_state_dict(checkpoint))
            model.save(folder)

        loop_config = {
            "stage": t.encoder,
            "model": encoder,
            "validation": t.validation,
            # the PNG grids map the volumes' intensity range to 0..255
            "volume_low": 0.0 if card["config"].get("normalise") == "zero_one" else -1.0,
        }
        return self.runner.train(
            runs,
            "encoder",
            self.encoder_key(card),
            encoder_worker_loop,
            loop_config,
            lambda: encoder_datasets(ingested, t.encoder, t.validation, workers, self.cfg.training.scaling.data_cpus),
            export,
            flatten(t.encoder, "cldm.training.encoder")
            | flatten(encoder, "cldm.encoder")
            | flatten(t.validation, "cldm.training.validation"),
        )

    def stage_latents(self, runs, card: dict, encoder_folder: Path) -> dict:
        from cohortcast.inference.study_latent_cache import build_study_latent_cache

        c = self.cfg.cldm.training.latent_cache
        run_id = runs.start_child("study_latents", flatten(c, "cldm.training.latent_cache"))
        started = time.perf_counter()
        try:
            cache = build_study_latent_cache(
                card["config"]["output"],
                encoder_folder,
                c.root,
                actors=c.actors,
                batch_size=c.batch_size,
                use_gpu=self.cfg.training.scaling.use_gpu,
            )
        except BaseException:
            runs.fail_child(run_id)
            raise
        seconds = time.perf_counter() - started
        runs.log_dict(run_id, {k: v for k, v in cache.items() if k != "reused"}, "latent_card.json")
        rows = {f"rows_{d}d": n for d, n in cache["rows"].items()}
        built = {} if cache["reused"] else {"studies_per_s": sum(rows.values()) / max(seconds, 1e-9)}
        runs.log_metrics(run_id, {"rows": sum(rows.values()), **rows, **built, "seconds": seconds})
        self.runner.report(
            runs,
            run_id,
            StageReport(
                "study_latents",
                "up to date" if cache["reused"] else "built",
                cache["path"],
                seconds,
                metrics={"rows": sum(rows.values()), **rows, **built},
            ),
        )
        return cache

    def run(self, runs, card: dict) -> CLDMOutputs:
        """The stages after ingestion, in order; each skipped when up to date. Part 2's
        stages need the latent cache: they run when `study_latents` is listed or its
        cache exists, and each of them is listed or has an output."""
        from cohortcast.pipeline.cldm_forecast_stages import stage_forecaster

        check_ingested_shapes(self.cfg.cldm.encoder, card)
        stages = self.cfg.cldm.training.stages
        out = CLDMOutputs(encoder=self.stage_encoder(runs, card))
        if "study_latents" not in stages:
            return out
        cache = self.stage_latents(runs, card, out.encoder)
        out.latents = Path(cache["path"])
        if "segmentation" in stages:
            out.segmentation = self.stage_decoder(runs, card, "segmentation", out.latents)
        if "report" in stages and 2 in self.cfg.cldm.models.latent.dims:
            out.report = self.stage_decoder(runs, card, "report", out.latents)
        for kind in ("diffusion", "regressor"):
            if kind in stages:
                folder = stage_forecaster(self, runs, card, kind, out.latents, out.segmentation, out.report)
                setattr(out, kind, folder)
        return out

    def stage_decoder(self, runs, card: dict, name: str, cache: Path) -> Path:
        from cohortcast.pipeline.cldm_decoder_stages import stage_report, stage_segmentation

        return (stage_segmentation if name == "segmentation" else stage_report)(self, runs, card, cache)


def run_cldm(cfg: CohortcastConfig) -> CLDMReport:
    from cohortcast.data.prepare import prepare_cohort
    from cohortcast.ray_runtime import ensure_ray
    from cohortcast.tracking.job_runs import JobRuns, card_summary

    cfg = resolve_paths(cfg)
    ensure_ray(cfg.ray)
    job = CLDMJob(cfg)
    with JobRuns(cfg) as runs:
        card = prepare_cohort(cfg)
        runs.log_dict(runs.parent_id, card_summary(card), "dataset/ingest_card.json")
        out = job.run(runs, card)
        if runs.enabled:
            for name, folder in vars(out).items():
                if folder is not None:
                    tag = "study_latents" if name == "latents" else name
                    runs.client.set_tag(runs.parent_id, f"cohortcast.{tag}", str(folder))
        return CLDMReport(job.reports, out, runs.location(), runs.parent_id)


def format_report(report: CLDMReport) -> str:
    lines = ["CLDM job summary", *format_stages(report.stages)]
    for name, folder in vars(report.outputs).items():
        if folder is not None:
            lines.append(f"{name.replace('_', ' ').capitalize()}: {folder}")
    lines.append(report.mlflow)
    return "\n".join(lines)
