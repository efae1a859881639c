"""CLDM part 2's training stages (issue 16), after the encoder and the study latent cache:

- `segmentation`: the segmentation decoder on current-exam CT latents (tokens -> the
  study's own ILD mask);
- `report`: the report decoder on current-exam radiograph latents (tokens, and the
  previous exam's tokens unless dropped, -> the study's own report);
- `diffusion`: the CLDM forecaster (temporal transformer + token denoiser) on
  trajectories: a fresh target exam per trajectory per epoch, priors truncated at random
  (1, a few and all priors all in distribution), loss `L_diff + task_weight * L_task`
  through the frozen decoders;
- `regressor`: the no-diffusion baseline, the same networks in one pass (MSE), with the
  same task loss.

Dataclasses only; the stages live in training/cldm_*.py."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from cohortcast.config.loader import require as _require
from cohortcast.config.training import StageConfig


def validate_paired_batches(stage) -> None:
    """A stage stepping on one CT and one radiograph batch (encoder, diffusion, regressor):
    `micro_batch_size` is derived from the two sizes and must stay 0; one size must be > 0."""
    _require(
        stage.micro_batch_size == 0,
        "micro_batch_size",
        "is derived for this stage (micro_batch_3d + micro_batch_2d); set those instead",
    )
    _require(min(stage.micro_batch_3d, stage.micro_batch_2d) >= 0, "micro_batch_3d", "batch sizes must be >= 0")
    _require(
        stage.micro_batch_3d + stage.micro_batch_2d >= 1,
        "micro_batch_3d",
        "micro_batch_3d and micro_batch_2d are both 0: nothing to train on",
    )


@dataclass
class DecoderStageConfig(StageConfig):
    """A decoder stage (`segmentation` or `report`) on current-exam latents: the
    optimiser, schedule, ZeRO stage and checkpoints are StageConfig's.
    `prior_dropout` (report only): the share of rows trained with the learned "no prior"
    tokens instead of the previous exam's, so one decoder writes reports with and
    without a prior (Table 2's +Prior column)."""

    max_steps: int = 20
    micro_batch_size: int = 8
    lr: float = 1e-3
    prior_dropout: float = 0.5

    def validate(self) -> None:
        StageConfig.validate(self)
        _require(0.0 <= self.prior_dropout <= 1.0, "prior_dropout", "must be in [0, 1]")


@dataclass
class DiffusionStageConfig(StageConfig):
    """Stage `diffusion` (and `regressor`, the same settings): every optimizer step
    takes, per worker, `micro_batch_3d` CT trajectories and `micro_batch_2d` radiograph
    trajectories (0 leaves a kind out), each with a fresh target exam drawn per epoch.

    `task_weight` is the paper's lambda: L = L_diff + lambda * L_task, L_task the frozen
    segmentation decoder's Dice + BCE on the predicted clean CT latent against the target's
    mask, and the frozen report decoder's token cross-entropy on the predicted radiograph
    latent against the target's report. `task_weighting`: "alpha_bar" weights each row's
    task loss by the noise level's a_t (at large t the clean-latent estimate is mostly
    noise; the NAMD path's choice), "uniform" weights every row alike.
    `truncate_priors`: keep the k most recent priors, k uniform in 1..n, per row.
    `micro_batch_size` is derived and must stay 0."""

    max_steps: int = 20
    micro_batch_size: int = 0
    micro_batch_3d: int = 8
    micro_batch_2d: int = 8
    lr: float = 5e-4
    task_weight: float = 1.0
    task_weighting: Literal["alpha_bar", "uniform"] = "alpha_bar"
    truncate_priors: bool = True

    def validate(self) -> None:
        validate_paired_batches(self)
        _require(self.task_weight >= 0, "task_weight", "must be >= 0")
        StageConfig.validate(replace(self, micro_batch_size=self.micro_batch_3d + self.micro_batch_2d))


@dataclass
class ForecastValidationConfig:
    """Validation of the `diffusion` and `regressor` stages (world rank 0), every
    `every_epochs` epochs and at the end: up to `max_cases` val CT targets (the last
    exam of each val trajectory with all its priors) forecast with `samples` samples of
    `inference_steps` DDIM steps from `seed`, decoded by the segmentation decoder; the
    aVD and Dice of the mean forecast next to copy-last's. The weights with the lowest
    val aVD are kept (the stage's export)."""

    every_epochs: int = 5
    max_cases: int = 16
    samples: int = 4
    inference_steps: int = 20
    seed: int = 0

    def validate(self) -> None:
        _require(self.every_epochs >= 1, "every_epochs", "must be >= 1")
        _require(self.max_cases >= 1 and self.samples >= 1, "max_cases", "max_cases and samples must be >= 1")
        _require(self.inference_steps >= 1, "inference_steps", "must be >= 1")


@dataclass
class TinyLMConfig:
    """Debug configs have no local BioGPT: with `write_if_missing` and `cldm.models.report.lm_path`
    unset, the job writes a tiny randomly initialised GPT-2 with a word-level tokenizer
    built from the training split's reports to `<cldm.training.output>/tiny_lm` (debug only)."""

    write_if_missing: bool = False
    hidden_size: int = 64
    layers: int = 2
