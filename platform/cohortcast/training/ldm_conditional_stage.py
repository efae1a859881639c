"""Stage d: conditional fine-tuning of the whole Forecaster (NAMD Sec. 3.3, CLDM Eq. 1).

The denoiser starts from stage c, the VAE from stage a (frozen: it defines the latent
space the cache was built in). Trained: denoiser, temporal transformer, EHR projection
and EHR encoder (soft prompts; the LLM itself is frozen). Loss = L_diff + lambda * L_task:

- L_diff: MSE to the scheduler's prediction target (v by default, see SchedulerConfig)
  for the generated quantity (the scaled change follow-up - baseline, or the follow-up
  latent; DenoiserConfig.target), the noisy one channel-concatenated to the baseline
  latent, context [EHR, temporal, target date], the whole context dropped to the nulls
  with probability `denoiser.condition_dropout` (classifier-free guidance).
- L_task on the predicted clean follow-up latent (x0 from the network output, mapped
  back from change space): "probe_bce" - the frozen VAE probe's malignancy BCE (rows
  with a label); "decoded_l1" - L1 of the decoded prediction against the real follow-up
  crop. Each row is weighted by a_t (our choice): at large t the x0 estimate is mostly
  noise and would swamp the gradient, at small t it is an accurate image estimate.

Forecaster kind "regression" (the no-diffusion baseline) trains the same networks on
MSE to the generated quantity from a zero input at the last timestep; L_task applies
to its prediction unweighted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cohortcast.config.models import ForecasterConfig
from cohortcast.models.denoiser import condition_dropout_mask
from cohortcast.models.schedulers import predicted_clean, training_target


class ConditionalObjective(nn.Module):
    """Wraps the Forecaster so the DeepSpeed engine's forward is the stage-d loss."""

    def __init__(self, forecaster, task_loss: str = "probe_bce", task_weight: float = 1.0):
        super().__init__()
        self.forecaster = forecaster
        self.scheduler = forecaster.train_scheduler()
        self.task_loss, self.task_weight = task_loss, task_weight
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)

    def context(self, batch: dict, drop: torch.Tensor | None) -> torch.Tensor:
        f = self.forecaster
        dtype = f.denoiser.null_context.dtype
        ehr = batch["ehr"] if f.conditioner is not None else None
        return f.context(
            ehr,
            batch["prior_latents"].to(dtype),
            batch["days_before_target"],
            batch["exam_mask"],
            batch["horizon_days"],
            drop,
        )

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        f = self.forecaster
        dtype = f.denoiser.null_context.dtype
        target, baseline = batch["target"].to(dtype), batch["baseline"].to(dtype)
        clean = f.to_generated(target, baseline)  # what the denoiser generates
        rows = target.shape[0]
        drop = condition_dropout_mask(rows, f.cfg.denoiser.condition_dropout, device=target.device)
        context = self.context(batch, drop)
        if f.cfg.kind == "regression":
            predicted = f.regress(baseline, context)
            terms = {"diffusion": F.mse_loss(predicted.float(), clean.float())}
            x0, weight = predicted.float(), torch.ones(rows, device=target.device)
        else:
            noise = torch.randn_like(clean)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (rows,), device=target.device)
            noisy = self.scheduler.add_noise(clean, noise, t)
            out = f.denoiser(noisy, t, baseline, context)
            terms = {"diffusion": F.mse_loss(out.float(), training_target(self.scheduler, clean, noise, t).float())}
            x0 = predicted_clean(self.alphas_cumprod, noisy, out, t, self.scheduler.config.prediction_type)
            weight = self.alphas_cumprod.to(target.device)[t]
        total = terms["diffusion"]
        if self.task_loss != "none":
            follow_up = f.from_generated(x0, baseline.float())
            terms["task"] = self._task(follow_up, batch, weight)
            total = total + self.task_weight * terms["task"]
        terms["total"] = total
        return terms

    def _task(self, x0: torch.Tensor, batch: dict, weight: torch.Tensor) -> torch.Tensor:
        vae = self.forecaster.vae
        dtype = vae.probe.weight.dtype
        if self.task_loss == "probe_bce":
            labelled = batch["label"] >= 0
            if "orientation" in batch:  # the probe was trained on crops as ingested only
                labelled = labelled & (batch["orientation"] == 0)
            if not labelled.any():
                return x0.sum() * 0.0
            logits = vae.probe_logit((x0 / vae.scaling_factor).to(dtype)).float()
            per_row = F.binary_cross_entropy_with_logits(logits, batch["label"].clamp(min=0), reduction="none")
            return (per_row * weight * labelled).sum() / labelled.sum()
        decoded = vae.decode((x0 / vae.scaling_factor).to(dtype)).float()
        per_row = (decoded - batch["target_crop"].float()).abs().flatten(1).mean(1)
        return (per_row * weight).mean()


def load_state(folder: str | Path, file: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / file))


def build_conditional_forecaster(
    model_cfg: ForecasterConfig, vae_folder: str | Path, denoiser_state: dict[str, torch.Tensor] | None
):
    """Forecaster with the stage-a VAE (frozen) and, if given, the stage-c denoiser.
    The unconditional denoiser has no EHR projection: the only keys it may lack."""
    from cohortcast.models.forecaster import Forecaster
    from cohortcast.models.vae import load_vae

    forecaster = Forecaster(model_cfg)
    trained_vae = load_vae(vae_folder)
    forecaster.vae.load_state_dict(trained_vae.state_dict())
    forecaster.vae.set_scaling_factor(trained_vae.scaling_factor)  # saved with the Forecaster's config
    forecaster.vae.requires_grad_(False)
    if denoiser_state is not None:
        missing, unexpected = forecaster.denoiser.load_state_dict(denoiser_state, strict=False)
        wrong = [k for k in missing if not k.startswith("ehr_proj.")] + list(unexpected)
        if wrong:
            raise ValueError(f"stage-c denoiser does not fit the conditional model: {wrong[:5]}")
    return forecaster


def validate_conditional(engine, batches, cfg) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Val losses on fixed target draws and noise, plus forecasts of up to `cfg.cases`
    val cases through the Forecaster's own inference path: latent error of the mean
    forecast against the real follow-up latent (the stage's model-selection metric),
    MAE of the decoded mean forecast, each next to the no-change reference (baseline)."""
    from cohortcast.training.image_grid import image_grid
    from cohortcast.training.trajectories import sample_targets

    objective: ConditionalObjective = engine.module
    forecaster = objective.forecaster
    device = next(objective.parameters()).device
    rng = np.random.default_rng(cfg.seed)
    sums: dict[str, float] = {}
    errors = {"latent_error": 0.0, "no_change_latent_error": 0.0, "forecast_mae": 0.0, "no_change_mae": 0.0}
    seen, forecast_cases, shown = 0, 0, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for raw in batches:
            batch = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in sample_targets(raw, rng, augment=False).items()
            }
            rows = batch["target"].shape[0]
            if seen < cfg.max_rows:
                for k, v in objective(batch).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * rows
                seen += rows
            take = min(rows, cfg.cases - forecast_cases)
            if take > 0:
                case = {k: v[:take] for k, v in batch.items()}
                forecast = forecaster.forecast(
                    case["baseline_crop"],
                    case["horizon_days"],
                    case["case_id"],
                    ehr=case["ehr"] if forecaster.conditioner is not None else None,
                    prior_images=case["prior_crops"],
                    days_before_target=case["days_before_target"],
                    exam_mask=case["exam_mask"],
                    num_samples=cfg.samples,
                    seed=cfg.seed,
                    steps=cfg.inference_steps,
                )
                real, real_latent = case["target_crop"].float(), case["target"].float()
                per_case = {
                    "latent_error": (forecast.latents.mean(1).float() - real_latent).abs(),
                    "no_change_latent_error": (case["baseline"].float() - real_latent).abs(),
                    "forecast_mae": (forecast.mean.float() - real).abs(),
                    "no_change_mae": (case["baseline_crop"].float() - real).abs(),
                }
                for k, v in per_case.items():
                    errors[k] += float(v.flatten(1).mean(1).sum())
                if shown is None:
                    shown = [case["baseline_crop"], *forecast.samples.float().unbind(1), real]
                forecast_cases += take
            if seen >= cfg.max_rows and forecast_cases >= cfg.cases:
                break
    if not seen:
        return {}, {}
    metrics = {f"loss_{k}": v / seen for k, v in sums.items()}
    metrics.update({k: v / max(forecast_cases, 1) for k, v in errors.items()})
    return metrics, {"baseline_samples_followup": image_grid(shown)}


def ldm_conditional_worker_loop(config: dict) -> None:
    """Ray Train loop; config: stage, model (ForecasterConfig), vae_folder, denoiser_folder,
    task_loss, task_weight, validation (ValidationConfig), tracking, optional best_path
    (where rank 0 keeps the weights with the lowest validation latent error)."""
    from cohortcast.training.stage_loop import StageHooks, run_stage_loop
    from cohortcast.training.trajectories import sample_targets

    val_cfg = config["validation"]

    def build():
        state = load_state(config["denoiser_folder"], "denoiser.safetensors") if config.get("denoiser_folder") else None
        forecaster = build_conditional_forecaster(config["model"], config["vae_folder"], state)
        return ConditionalObjective(forecaster, config["task_loss"], config["task_weight"])

    hooks = StageHooks(
        prepare_batch=sample_targets,
        validate=lambda engine, batches: validate_conditional(engine, batches, val_cfg),
        validate_every_epochs=val_cfg.every_epochs,
        tracking=config.get("tracking"),
        best_metric="latent_error",
        best_path=config.get("best_path"),
    )
    run_stage_loop(config["stage"], build, lambda engine, batch: engine(batch), hooks)
