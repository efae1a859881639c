"""What the sweep needs to know of the job it sweeps (`tune.job`): which stages are the
shared upstream (trained once per distinct upstream key) and which stage a trial trains,
where their outputs go, and how to run them. The sweep itself (grid, Tune, MLflow,
summary, resume) is job-agnostic (tuning/sweep.py, tuning/trial.py).

- `namd`: upstream = VAE, latent cache, unconditional LDM (`training.output`);
  trial = the conditional LDM (stage d).
- `cldm`: upstream = encoder, study latent cache, segmentation and report decoders
  (`cldm.training.output`); trial = the `diffusion` stage (the CLDM forecaster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from cohortcast.config.loader import ConfigError
from cohortcast.config.schema import CohortcastConfig


class SweepJob:
    name: ClassVar[str]
    title: ClassVar[str]  # for the printed summary
    upstream_what: ClassVar[str]
    train_script: ClassVar[str]  # what runs the best config
    output_key: ClassVar[str]  # the dotted config key of the job's stage output folder

    def check(self, cfg: CohortcastConfig) -> None:
        """Refuse, before any work, a config the sweep cannot run."""

    def upstream_key(self, cfg: CohortcastConfig) -> str:
        raise NotImplementedError

    def set_output(self, cfg: CohortcastConfig, folder: str) -> None:
        node = cfg
        *parents, leaf = self.output_key.split(".")
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, folder)

    def upstream_config(self, cfg: CohortcastConfig) -> CohortcastConfig:
        return cfg

    def before_upstreams(self, cfg: CohortcastConfig, card: dict) -> None:
        pass

    def prepare_upstream(self, cfg: CohortcastConfig, runs, card: dict) -> dict[str, Any]:
        """Train (or find up to date) one upstream from its upstream config; returns what
        its trials need (paths and small dicts: it travels to every trial)."""
        raise NotImplementedError

    def shared_datasets(self, trials: list[CohortcastConfig], upstream: dict[str, dict]) -> dict[tuple, dict]:
        return {}

    def train_trial(self, cfg: CohortcastConfig, runs, upstream: dict, context, callbacks: list):
        """The trial's stage on its config; returns (its output folder, its StageReport)."""
        raise NotImplementedError

    def max_steps(self, cfg: CohortcastConfig) -> int:
        raise NotImplementedError


class NAMDSweep(SweepJob):
    name = "namd"
    title = "NAMD"
    upstream_what = "VAE + latent cache + unconditional LDM"
    train_script = "jobs/train_namd.py"
    output_key = "training.output"

    def upstream_key(self, cfg: CohortcastConfig) -> str:
        """What stages a-c depend on besides the cohort: trials with equal keys share one VAE,
        latent cache and unconditional LDM (a lambda-only grid trains each once)."""
        from cohortcast.io.stage_outputs import stage_key

        t, m = cfg.training, cfg.model
        return stage_key(
            "upstream", t.vae, m.vae, t.latent_cache, t.ldm_uncond, m.denoiser, m.scheduler, t.scaling.num_workers
        )

    def before_upstreams(self, cfg: CohortcastConfig, card: dict) -> None:
        from cohortcast.pipeline.tiny_llm_setup import ensure_debug_llm

        ensure_debug_llm(cfg, card)

    def prepare_upstream(self, cfg: CohortcastConfig, runs, card: dict) -> dict[str, Any]:
        from cohortcast.pipeline.namd import NAMDJob

        job = NAMDJob(cfg)
        vae = job.stage_vae(runs, card)
        cache = job.stage_latents(runs, card, vae)
        denoiser = job.stage_ldm_uncond(runs, cache)
        return {"vae": str(vae), "cache": cache, "denoiser": str(denoiser)}

    def shared_datasets(self, trials: list[CohortcastConfig], upstream: dict[str, dict]) -> dict[tuple, dict]:
        """The trajectory datasets of every upstream that a not-yet-finished trial needs,
        built once (a resumed sweep whose trials all finished builds none)."""
        from cohortcast.io import stage_outputs as outputs
        from cohortcast.pipeline.namd import NAMDJob, trajectory_datasets

        built: dict[tuple, dict] = {}
        for trial in trials:
            key = (self.upstream_key(trial), trial.model.temporal.max_exams)
            up = upstream[key[0]]
            job = NAMDJob(trial)
            done = outputs.is_valid(job.output / "ldm_cond", job.ldm_cond_key(up["cache"], Path(up["denoiser"])))
            if key not in built and not done:
                built[key] = trajectory_datasets(up["cache"], key[1], trial.training.scaling.data_cpus)
        return built

    def train_trial(self, cfg: CohortcastConfig, runs, upstream: dict, context, callbacks: list):
        from cohortcast.pipeline.namd import NAMDJob

        job = NAMDJob(cfg, train_callbacks=callbacks)
        datasets = context.datasets.get((self.upstream_key(cfg), cfg.model.temporal.max_exams))
        folder = job.stage_ldm_cond(
            runs, upstream["cache"], Path(upstream["vae"]), Path(upstream["denoiser"]), datasets
        )
        return folder, job.reports[-1]

    def max_steps(self, cfg: CohortcastConfig) -> int:
        return cfg.training.ldm_cond.max_steps


CLDM_UPSTREAM_STAGES = ("encoder", "study_latents", "segmentation", "report")
CLDM_TRIAL_STAGE = "diffusion"


class CLDMSweep(SweepJob):
    name = "cldm"
    title = "CLDM"
    upstream_what = "encoder + study latent cache + decoders"
    train_script = "jobs/train_cldm.py"
    output_key = "cldm.training.output"

    def check(self, cfg: CohortcastConfig) -> None:
        for key in cfg.tune.grid:
            if not key.startswith("cldm."):
                raise ConfigError(
                    f"tune.grid.{key}: not a CLDM setting (cldm.*); CLDM's lambda is "
                    "cldm.training.diffusion.task_weight"
                )
        stages = cfg.cldm.training.stages
        missing = [s for s in ("encoder", "study_latents", CLDM_TRIAL_STAGE) if s not in stages]
        if missing:
            raise ConfigError(
                f"cldm.training.stages: a CLDM sweep trains the upstream stages once and {CLDM_TRIAL_STAGE!r} "
                f"per trial; add {missing}"
            )
        metric = cfg.tune.metric.rsplit("/", 1)[-1]
        if "segmentation" not in stages and ("avd" in metric or "dice" in metric):
            raise ConfigError(
                f"tune.metric: {cfg.tune.metric} needs the segmentation decoder (add 'segmentation' to "
                "cldm.training.stages), or pick a latent metric such as val/latent_error_3d"
            )

    def upstream_key(self, cfg: CohortcastConfig) -> str:
        """What the encoder, the study latent cache and the decoders depend on besides the
        cohort: a grid over the diffusion stage (lambda) or the forecaster trains them once."""
        from cohortcast.io.stage_outputs import stage_key

        c, t = cfg.cldm, cfg.cldm.training
        return stage_key(
            "cldm-upstream",
            c.encoder,
            t.encoder,
            t.validation,
            t.latent_cache,
            t.segmentation,
            t.report,
            t.tiny_lm,
            c.models.latent.dims,
            c.models.segmentation,
            c.models.report,
            self._upstream_stages(cfg),
            cfg.training.scaling.num_workers,
        )

    @staticmethod
    def _upstream_stages(cfg: CohortcastConfig) -> tuple[str, ...]:
        return tuple(s for s in cfg.cldm.training.stages if s in CLDM_UPSTREAM_STAGES)

    def upstream_config(self, cfg: CohortcastConfig) -> CohortcastConfig:
        cfg.cldm.training.stages = self._upstream_stages(cfg)
        return cfg

    def prepare_upstream(self, cfg: CohortcastConfig, runs, card: dict) -> dict[str, Any]:
        from cohortcast.pipeline.cldm import CLDMJob

        out = CLDMJob(cfg).run(runs, card)  # the upstream config lists only the upstream stages
        return {
            "card": card,
            **{k: None if v is None else str(v) for k, v in vars(out).items() if k not in ("diffusion", "regressor")},
        }

    def train_trial(self, cfg: CohortcastConfig, runs, upstream: dict, context, callbacks: list):
        """The diffusion stage into `<trial folder>/diffusion`, on the shared latent cache
        and through the shared (frozen) decoders."""
        from cohortcast.pipeline.cldm import CLDMJob
        from cohortcast.pipeline.cldm_forecast_stages import stage_forecaster

        job = CLDMJob(cfg, train_callbacks=callbacks)
        folder = stage_forecaster(
            job,
            runs,
            upstream["card"],
            CLDM_TRIAL_STAGE,
            upstream["latents"],
            Path(upstream["segmentation"]) if upstream["segmentation"] else None,
            Path(upstream["report"]) if upstream["report"] else None,
        )
        return folder, job.reports[-1]

    def max_steps(self, cfg: CohortcastConfig) -> int:
        return cfg.cldm.training.diffusion.max_steps


JOBS: dict[str, SweepJob] = {job.name: job for job in (NAMDSweep(), CLDMSweep())}


def sweep_job(cfg: CohortcastConfig) -> SweepJob:
    return JOBS[cfg.tune.job]
