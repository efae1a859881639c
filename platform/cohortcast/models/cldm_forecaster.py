"""The CLDM forecaster (paper Sec. 3): temporal transformer over 1..K prior study latents
+ conditional latent diffusion over the target study's tokens.

- Each prior study is its universal-encoder tokens (1 + N, dim). The temporal transformer
  (models/temporal.py, reused as is) reads one vector per prior (`prior_summary`: the
  [CLS] z_d as in the paper, or [CLS] + mean patch token) concatenated with a learned
  embedding of its date (days before the target), plus a [CLS] whose output is s_n; the
  target date gets its own embedding d_next (the horizon from the most recent prior).
- The token denoiser (models/token_denoiser.py) diffuses the target's tokens, conditioned
  by cross-attention on (s_n, d_next), with the most recent prior's tokens as its
  baseline input; `denoiser.target` "change" diffuses the scaled change from that prior.
- Priors arrive padded: (B, K, 1 + N, dim) tokens, (B, K) days before the target,
  (B, K) exam mask (True = a real prior). The temporal transformer always sees
  `temporal.max_exams` slots (padded here), so a case's context has the same bits
  whatever the other cases in its batch have.

`loss(...)` is L_diff for one training batch (random timesteps, noise and CFG drops from
the caller's generator) and returns the predicted clean target tokens for the paper's
lambda * L_task; the caller picks the target exam and truncates priors
(`random_prior_truncation` helps). `forecast(...)` draws N seeded samples per case with
the shared sampler (models/sampler.py): bit-identical for a case alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cohortcast.config import from_dict
from cohortcast.config.cldm_models import CLDMModelsConfig
from cohortcast.models.cldm_io import check_config, load_weights, read_model_meta, save_model_folder
from cohortcast.models.denoiser import condition_dropout_mask
from cohortcast.models.sampler import forecast_latents, run_fixed_chunks
from cohortcast.models.schedulers import (
    default_eta,
    inference_scheduler,
    predicted_clean,
    train_scheduler,
    training_target,
)
from cohortcast.models.temporal import TemporalContextEncoder
from cohortcast.models.token_denoiser import TokenDenoiser

# Settings a saved model may differ in from the caller's config: how it samples (forecast
# arguments override them), training-only knobs, values computed during training
# (target scales: the saved ones are used), and the decoders (other folders).
RUNTIME_FIELDS = (
    "scheduler.inference_steps",
    "scheduler.eta",
    "scheduler.sampler",
    "scheduler.guidance_scale",
    "scheduler.num_samples",
    "scheduler.micro_batch",
    "denoiser.condition_dropout",
    "denoiser.target_scale_2d",
    "denoiser.target_scale_3d",
    "segmentation.",
    "report.",
)


@dataclass
class TokenForecast:
    samples: torch.Tensor  # (B, S, 1 + N, dim) forecast study tokens, [CLS] first
    mean: torch.Tensor  # (B, 1 + N, dim)
    variance: torch.Tensor  # (B, 1 + N, dim) element-wise over the S samples (unbiased; 0 when S == 1)
    baseline: torch.Tensor  # (B, 1 + N, dim) the most recent prior's tokens


@dataclass
class DiffusionLoss:
    loss: torch.Tensor  # scalar: L_diff (MSE against the scheduler's target)
    predicted: torch.Tensor  # (B, 1 + N, dim) the clean target tokens the prediction implies (for L_task)
    timesteps: torch.Tensor  # (B,)


class PriorPool(nn.Module):
    """`prior_summary: pooled`: one learned query attends over each prior's tokens ([CLS]
    and patches), trained with the forecaster. MAE-style pre-training never trains the
    [CLS] directly; on the debug cohort a ridge probe of the fibrotic fraction from [CLS]
    (or the mean patch token) scored no better than predicting the mean, from all patch
    tokens it did (README), so a summary that can weight the diseased patches is needed
    for the priors' trend to reach the temporal transformer."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, prior_tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, 1 + N, dim) -> (B, K, dim)."""
        b, k = prior_tokens.shape[:2]
        kv = self.norm(prior_tokens.flatten(0, 1))  # (B*K, 1 + N, dim)
        pooled, _ = self.attn(self.query.expand(kv.shape[0], -1, -1), kv, kv, need_weights=False)
        return (pooled[:, 0] + self.query[0, 0]).reshape(b, k, -1)


def prior_features(prior_tokens: torch.Tensor, how: str, pool: PriorPool | None = None) -> torch.Tensor:
    """(B, K, 1 + N, dim) -> (B, K, F): one vector per prior for the temporal transformer."""
    if how == "cls":
        return prior_tokens[:, :, 0]
    if how == "cls_mean":
        return torch.cat([prior_tokens[:, :, 0], prior_tokens[:, :, 1:].mean(dim=2)], dim=-1)
    if how == "pooled" and pool is not None:
        return pool(prior_tokens)
    raise ValueError(f"unknown prior_summary {how!r}")


def last_prior_index(days_before_target: torch.Tensor, exam_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each case's most recent real prior (fewest days before the target)."""
    if not exam_mask.any(dim=1).all():
        raise ValueError("every case needs at least one prior exam")
    days = torch.where(exam_mask.bool(), days_before_target.float(), torch.inf)
    return days.argmin(dim=1)


def random_prior_truncation(
    days_before_target: torch.Tensor, exam_mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A new exam mask keeping each case's k most recent real priors, k uniform in 1..n
    (n its real priors): one, a few and all priors all occur in training."""
    mask = exam_mask.bool().cpu()
    days = torch.where(mask, days_before_target.float().cpu(), torch.inf)
    n = mask.sum(dim=1)
    k = (torch.rand(n.shape, generator=generator) * n).long() + 1  # in 1..n
    rank = days.argsort(dim=1).argsort(dim=1)  # 0 = most recent
    return ((rank < k[:, None]) & mask).to(exam_mask.device)


def canonical_priors(features: torch.Tensor, days: torch.Tensor, mask: torch.Tensor):
    """Real priors first, oldest first, padding zeroed after them: the temporal transformer
    is order-invariant in exact arithmetic but not in floating point, so a case's priors
    must reach it in the same slots whatever padding its batch needed."""
    mask = mask.bool()
    order = torch.where(mask, -days.float(), torch.inf).argsort(dim=1, stable=True)
    mask = mask.gather(1, order)
    days = days.float().gather(1, order) * mask
    features = features.gather(1, order[..., None].expand_as(features)) * mask[..., None]
    return features, days, mask


def pad_exams(tensor: torch.Tensor, slots: int, value=0) -> torch.Tensor:
    """Pad dim 1 (exams) to `slots`."""
    k = tensor.shape[1]
    if k > slots:
        raise ValueError(f"{k} prior exams exceed temporal.max_exams={slots}")
    pad = [0, 0] * (tensor.dim() - 2) + [0, slots - k]
    return F.pad(tensor, pad, value=value)


class CLDMForecaster(nn.Module):
    KIND = "cldm_forecaster"

    def __init__(self, cfg: CLDMModelsConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        features = cfg.latent.dim * (2 if cfg.prior_summary == "cls_mean" else 1)
        self.prior_pool = PriorPool(cfg.latent.dim, cfg.report.pool_heads) if cfg.prior_summary == "pooled" else None
        self.temporal = TemporalContextEncoder(cfg.temporal, features, cfg.denoiser.width)
        self.denoiser = TokenDenoiser(cfg.latent, cfg.denoiser)
        self._train_scheduler = train_scheduler(cfg.scheduler)

    def inference_scheduler(self, sampler: str | None = None):
        return inference_scheduler(self.cfg.scheduler, sampler)

    # ----- what is diffused: scaled change from the last prior, or scaled tokens --------
    def target_scale(self, dims: int) -> float:
        scale = getattr(self.cfg.denoiser, f"target_scale_{dims}d")
        if scale is None:
            raise ValueError(
                f"denoiser.target_scale_{dims}d is unset: compute it before training "
                "(fit_target_scale on the training targets) or load a trained model"
            )
        return float(scale)

    def generated_target(self, target: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        """Target tokens -> the denoiser's target space (unscaled)."""
        return target - baseline if self.cfg.denoiser.target == "change" else target

    def fit_target_scale(self, targets: torch.Tensor, baselines: torch.Tensor) -> float:
        """1 / std of the training targets in generated space; sets it in the config for the
        study kind these tokens are (call before training, on a representative sample)."""
        dims = self.cfg.latent.dims_of(targets.shape[1] - 1)
        std = float(self.generated_target(targets, baselines).float().std())
        if not std > 0:
            raise ValueError("the training targets have zero spread: cannot scale them")
        setattr(self.cfg.denoiser, f"target_scale_{dims}d", 1.0 / std)
        return 1.0 / std

    def to_generated(self, target: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        dims = self.cfg.latent.dims_of(target.shape[-2] - 1)
        return self.generated_target(target, baseline) * self.target_scale(dims)

    def from_generated(self, generated: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        """Inverse of to_generated; `baseline` broadcasts (e.g. (B, 1, 1 + N, dim) for samples)."""
        dims = self.cfg.latent.dims_of(generated.shape[-2] - 1)
        out = generated / self.target_scale(dims)
        return baseline + out if self.cfg.denoiser.target == "change" else out

    # ----- conditioning ----------------------------------------------------------------
    def _check(self, prior_tokens: torch.Tensor, days_before_target: torch.Tensor, exam_mask: torch.Tensor) -> None:
        if prior_tokens.dim() != 4 or prior_tokens.shape[-1] != self.cfg.latent.dim:
            raise ValueError(
                f"prior tokens must be (B, K, 1 + N, {self.cfg.latent.dim}), got {tuple(prior_tokens.shape)}"
            )
        if days_before_target.shape != prior_tokens.shape[:2] or exam_mask.shape != prior_tokens.shape[:2]:
            raise ValueError(
                f"days_before_target {tuple(days_before_target.shape)} and exam_mask {tuple(exam_mask.shape)} "
                f"must be (B, K) = {tuple(prior_tokens.shape[:2])}"
            )
        self.cfg.latent.dims_of(prior_tokens.shape[2] - 1)

    def baseline(self, prior_tokens: torch.Tensor, days_before_target: torch.Tensor, exam_mask: torch.Tensor):
        """(B, 1 + N, dim): the most recent real prior's tokens."""
        index = last_prior_index(days_before_target, exam_mask).to(prior_tokens.device)
        return prior_tokens[torch.arange(prior_tokens.shape[0], device=prior_tokens.device), index]

    def summarise_priors(self, prior_tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, 1 + N, dim) -> (B, K, F) one vector per prior (`prior_summary`)."""
        return prior_features(prior_tokens, self.cfg.prior_summary, self.prior_pool)

    def _context_rows(self, prior_tokens, days, mask, baseline, drop=None) -> torch.Tensor:
        slots = self.cfg.temporal.max_exams
        features, days, mask = canonical_priors(self.summarise_priors(prior_tokens), days, mask)
        days, mask = pad_exams(days, slots), pad_exams(mask, slots, value=False)
        horizon = torch.where(mask, days, torch.inf).min(dim=1).values  # the most recent prior to the target
        summary, target_date = self.temporal(pad_exams(features, slots), days, mask, horizon)
        return self.denoiser.build_context(summary, target_date, baseline, drop)

    def context(
        self,
        prior_tokens: torch.Tensor,
        days_before_target: torch.Tensor,
        exam_mask: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, S, width) cross-attention context, (B, 1 + N, dim) baseline tokens)."""
        self._check(prior_tokens, days_before_target, exam_mask)
        baseline = self.baseline(prior_tokens, days_before_target, exam_mask)
        return self._context_rows(prior_tokens, days_before_target, exam_mask, baseline, drop), baseline

    # ----- training --------------------------------------------------------------------
    def loss(
        self,
        prior_tokens: torch.Tensor,
        days_before_target: torch.Tensor,
        exam_mask: torch.Tensor,
        target_tokens: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> DiffusionLoss:
        """L_diff on one batch: target_tokens (B, 1 + N, dim) the target study. Timesteps,
        noise and the rows trained on the null context (classifier-free guidance) are drawn
        on the CPU from `generator`, so a seeded run repeats on any device."""
        b = target_tokens.shape[0]
        device = target_tokens.device
        drop = condition_dropout_mask(b, self.cfg.denoiser.condition_dropout, generator).to(device)
        context, baseline = self.context(prior_tokens, days_before_target, exam_mask, drop)
        clean = self.to_generated(target_tokens, baseline)
        sched = self._train_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(device)
        noise = torch.randn(clean.shape, generator=generator).to(device=device, dtype=clean.dtype)
        noisy = sched.add_noise(clean, noise, t)
        prediction = self.denoiser(noisy, t, baseline, context)
        loss = F.mse_loss(prediction.float(), training_target(sched, clean, noise, t).float())
        x0 = predicted_clean(sched.alphas_cumprod, noisy, prediction, t, sched.config.prediction_type)
        return DiffusionLoss(loss, self.from_generated(x0.to(baseline.dtype), baseline), t)

    # ----- forecasting -----------------------------------------------------------------
    def _conditioning(self, prior_tokens, days_before_target, exam_mask):
        """Baseline and context of every case in fixed micro-batches (batch-independent bits)."""
        self._check(prior_tokens, days_before_target, exam_mask)
        baseline = self.baseline(prior_tokens, days_before_target, exam_mask)
        slots = self.cfg.temporal.max_exams
        rows = [
            pad_exams(prior_tokens, slots),
            pad_exams(days_before_target.float(), slots),
            pad_exams(exam_mask.bool(), slots, value=False),
            baseline,
        ]
        context = run_fixed_chunks(self._context_rows, rows, self.cfg.scheduler.micro_batch)
        return baseline, context

    @torch.no_grad()
    def forecast(
        self,
        prior_tokens: torch.Tensor,
        days_before_target: torch.Tensor,
        exam_mask: torch.Tensor,
        case_ids: list[str],
        num_samples: int | None = None,
        seed: int | list[int] = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        sampler: str | None = None,
    ) -> TokenForecast:
        """N seeded samples of each case's target study tokens; `seed` one for all cases or
        one per case. Sample k of a case depends only on (seed, case id, k) and its inputs.
        `sampler`: "ddim" | "dpmsolver++" (default: the model's scheduler config)."""
        s = self.cfg.scheduler
        baseline, context = self._conditioning(prior_tokens, days_before_target, exam_mask)
        n = num_samples or s.num_samples
        generated = forecast_latents(
            self.denoiser,
            self.inference_scheduler(sampler),
            baseline,
            context,
            case_ids,
            n,
            seed,
            steps or s.inference_steps,
            s.guidance_scale if guidance_scale is None else guidance_scale,
            default_eta(s, sampler) if eta is None else eta,
            s.micro_batch,
        ).samples
        return self._token_forecast(self.from_generated(generated, baseline[:, None]), baseline)

    @staticmethod
    def _token_forecast(samples: torch.Tensor, baseline: torch.Tensor) -> TokenForecast:
        variance = samples.var(dim=1) if samples.shape[1] > 1 else torch.zeros_like(samples[:, 0])
        return TokenForecast(samples, samples.mean(dim=1), variance, baseline)

    # ----- persistence -----------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """`<kind>.json` (config, incl. the fitted target scales) + `<kind>.safetensors`."""
        save_model_folder(folder, self.KIND, self.cfg, self)

    @classmethod
    def load(cls, folder: str | Path, expected: CLDMModelsConfig | None = None, map_location: str = "cpu"):
        """Rebuild from `folder`; with `expected`, refuse a model saved with another
        architecture (run-time settings, target scales and decoder sections may differ)."""
        meta = read_model_meta(folder, cls.KIND)
        if expected is not None:
            check_config(folder, meta["config"], expected, ignore=RUNTIME_FIELDS)
        model = cls(from_dict(CLDMModelsConfig, meta["config"]))
        load_weights(folder, cls.KIND, model, map_location)
        return model.eval()
