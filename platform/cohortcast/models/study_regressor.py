"""The no-diffusion baseline (CLDM Table 1, "without diffusion"): the temporal summary s_n
and the target-date embedding straight to the target study's tokens, trained with MSE.

The paper's version is "a direct MLP regressor from the temporal transformer to the future
embedding". An MLP from two d-vectors to (1 + N) x d tokens would need ~1.2e9 weights at
the paper's size and could not reproduce the study's spatial detail; here the regressor
is the forecaster's own networks run once, deterministically: the same temporal
transformer and context, the same token transformer with the most recent prior's tokens
as its baseline input, fed an all-zero "noisy" input at the last timestep (the NAMD
regression baseline's recipe). The comparison with the CLDM then isolates what
generative noise refinement adds, which is what the paper's row tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cohortcast.models.cldm_forecaster import CLDMForecaster, DiffusionLoss, TokenForecast
from cohortcast.models.sampler import run_fixed_chunks


class StudyRegressor(CLDMForecaster):
    KIND = "study_regressor"

    def regression_timestep(self) -> int:
        return self.cfg.scheduler.num_train_timesteps - 1

    def regress(self, baseline: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One pass: (B, 1 + N, dim) prediction in the denoiser's target space."""
        t = torch.full((baseline.shape[0],), self.regression_timestep(), dtype=torch.long, device=baseline.device)
        return self.denoiser(torch.zeros_like(baseline), t, baseline, context)

    def loss(
        self,
        prior_tokens: torch.Tensor,
        days_before_target: torch.Tensor,
        exam_mask: torch.Tensor,
        target_tokens: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> DiffusionLoss:
        """MSE in the (scaled) target space; `predicted` the target tokens it implies.
        The all-False drop keeps the null tokens in the graph (zero gradient), so
        distributed data-parallel sees every parameter used."""
        drop = torch.zeros(target_tokens.shape[0], dtype=torch.bool, device=target_tokens.device)
        context, baseline = self.context(prior_tokens, days_before_target, exam_mask, drop)
        prediction = self.regress(baseline, context)
        loss = F.mse_loss(prediction.float(), self.to_generated(target_tokens, baseline).float())
        t = torch.full((target_tokens.shape[0],), self.regression_timestep(), dtype=torch.long)
        return DiffusionLoss(loss, self.from_generated(prediction, baseline), t)

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
        """The forecaster's signature (the sampling arguments are ignored); deterministic, so the N "samples" are the one
        prediction (variance exactly 0) and seed, steps, guidance and eta are ignored."""
        if len(case_ids) != prior_tokens.shape[0]:
            raise ValueError(f"{len(case_ids)} case ids for {prior_tokens.shape[0]} cases")
        baseline, context = self._conditioning(prior_tokens, days_before_target, exam_mask)
        generated = run_fixed_chunks(self.regress, [baseline, context], self.cfg.scheduler.micro_batch)
        n = num_samples or self.cfg.scheduler.num_samples
        tokens = self.from_generated(generated, baseline)
        return self._token_forecast(tokens[:, None].expand(-1, n, -1, -1), baseline)
